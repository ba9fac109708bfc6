"""Where training jobs run: the Ray Jobs API."""

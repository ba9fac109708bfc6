"""The Ray Serve application that serves a registered model version (``app.build_app``)."""

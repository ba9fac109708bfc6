"""One completion from a deployed model through the official ``openai`` client (``zeroplane complete``)."""

from __future__ import annotations

from typing import Optional

from .cluster.auth import in_clear_to_another_host
from .errors import ZeroplaneError


def complete(url: str, prompt: str, max_tokens: int = 32, temperature: float = 0.0, seed: Optional[int] = None,
             api_key: Optional[str] = None, timeout_s: float = 120.0, model: Optional[str] = None):
    """A completion from a deployed model through the official ``openai`` client (base URL ``<url>/v1``).

    Args:
        url: the application URL (:meth:`Client.serve_url`).
        prompt: the text to continue.
        max_tokens, temperature, seed: OpenAI's request fields (temperature 0 = greedy).
        api_key: bearer key (None: no ``Authorization`` header).
        timeout_s: seconds for the whole request (default 120).
        model: the ``model`` field (default: the last path segment of ``url``).

    Returns:
        The ``openai.types.Completion`` (``choices[0].text``, ``model``, ``usage``; ``model_dump()`` for JSON).

    Raises:
        ZeroplaneError: connection failure or an error answer (with the server's reason).
    """
    import openai

    if api_key and in_clear_to_another_host(url):
        import warnings

        warnings.warn(f"sending an API key over plain http:// to {url}; anyone on the network path can read it "
                      "(terminate TLS in front of Ray Serve and use https://)", stacklevel=2)
    # openai requires some key; without one the server answers 401 and the message says how to make one
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", timeout=timeout_s, max_retries=0)
    extra = {"seed": seed} if seed is not None else {}
    try:
        res = client.completions.create(model=model or url.rstrip("/").rsplit("/", 1)[-1], prompt=prompt,
                                        max_tokens=max_tokens, temperature=temperature, **extra)
    except openai.APIConnectionError as e:
        raise ZeroplaneError(f"cannot reach {url}: {e}") from None
    except openai.APIStatusError as e:
        try:
            reason = e.response.json()["error"]["message"]
        except Exception:
            reason = e.response.text[:300]
        hint = " (create a key with `zeroplane serve keys create --save`)" if e.status_code == 401 else ""
        if e.status_code == 404 and "not found" in reason.lower() and "Ping" in reason:
            reason = "no such application on this cluster's Ray Serve"
            hint = " (`zeroplane serve status` lists deployed models; `zeroplane promote` deploys one)"
        raise ZeroplaneError(f"{url} answered {e.status_code}: {reason}{hint}") from None
    return res

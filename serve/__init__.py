"""`llava-serve`: an OpenAI-compatible HTTP server over the runtime's continuous-batching scheduler (llava-rt[serve]).

`schema` holds the OpenAI objects, `media` reads image and video URLs, `completions` answers one chat completion,
`metrics` is the Prometheus registry, `config` the server's settings, `app` the FastAPI application and `cli` the
command. The runtime imports nothing from here; importing this package, `config` or `cli` needs none of the extra.
"""

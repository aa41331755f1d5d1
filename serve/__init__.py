"""An OpenAI-compatible HTTP server for a base model and its adapters: `python -m serve`.

protocol  request parsing, validation and response shapes (OpenAI's)
stops     incremental detokenization with stop strings
adapters  the named adapters on the one loaded base; loading and unloading at run time
engine    the scheduler thread that batches waiting requests, across adapters, with a KV cache
server    the HTTP layer (the standard library's ThreadingHTTPServer)
"""

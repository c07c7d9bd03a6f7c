"""gunicorn's side of `gunicorn classify_server:app`: its settings (gunicorn_config) and the worker class
(worker) that reads every request on an event loop with one strict parser (reader) and runs the WSGI
app on a thread (wsgi_call). Below the HTTP adapters; it knows nothing of the models."""

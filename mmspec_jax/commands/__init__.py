"""The commands (`mmspec-decode`, `mmspec-serve`, `mmspec-train`; decode.py, serve.py and train.py
at the top of the repository run the same): flags in, a job run, errors as `error: ...`."""

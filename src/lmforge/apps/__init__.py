"""The apps: what runs the stages or serves their models. pipeline (chains the stages and evaluates each),
constitutional_run (the constitutional AI loop), serve (the OpenAI-compatible server and web chat), report, and
verbs (the table of every CLI verb that cli.py and the pipeline read)."""

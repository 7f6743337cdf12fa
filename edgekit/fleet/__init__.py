"""The fleet from the host: what each board reports (status) and the model it should run (push)."""

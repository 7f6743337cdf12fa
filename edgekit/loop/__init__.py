"""The learning loop on the host: collect what boards flag into a store, relabel, export, retrain."""

"""The review web app (``yokai review``): look at the clusters and correct them in the browser."""

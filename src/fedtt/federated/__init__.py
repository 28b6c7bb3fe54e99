"""The federated runtime: Flower ServerApp, ClientApp and strategy, plus an in-process Grid."""

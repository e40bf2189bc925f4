"""How a stage runs fast on a GPU: decode steps replayed from CUDA graphs, vision graphs per image shape, and the
start-up warm-up that compiles every kernel before the first request. Built around a stage model from outside;
``model/`` never imports this package."""

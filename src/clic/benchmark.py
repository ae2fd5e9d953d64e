"""``clic benchmark`` (the runner comes in the next commit); registers ``clic evaluate`` (:mod:`clic.metrics`)."""


def register_cli(subparsers, add_model_options) -> None:
    from .metrics import register_cli as register_evaluate

    register_evaluate(subparsers, add_model_options)

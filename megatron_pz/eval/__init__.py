"""Evaluation of a policy through the rollout interface (``megatron-pz eval``; docs/eval.md).

``suites`` (registry + loaders -> ``EvalItem``), ``extract`` (answer extraction, light maths checker), ``answers``
(Math-Verify in a worker process, the light checker as fallback), ``score``
(per-response scores, mean@k, unbiased pass@k), ``runner`` (``EvalConfig``, ``run_suite``, ``evaluate``),
``report`` (JSON + Markdown), ``cli``, ``export`` (Megatron checkpoint -> HF folder with tokenizer).
Submodules are imported on use; importing the package pulls in nothing heavy.
"""

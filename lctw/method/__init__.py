"""The paper's method, one concept per module; read these to know what lctw computes.

* :mod:`.scoring`    short-context log-probs log p_θ′(x_i | last n tokens), exactly or by windows.
* :mod:`.scorers`    θ′: frozen (θ0), self (θ cut to n), small (a separate model), none; one protocol.
* :mod:`.weighting`  scores → per-token loss weights: uniform, dense (λ), sparse (κ), LongCE, PPMI, NPMI.
* :mod:`.context`    context extension n → N: RoPE θ scaling, position interpolation, YaRN, dynamic, Llama 3.
* :mod:`.attention`  the attention masks and kernels short-context scoring uses (sliding windows, sinks).
* :mod:`.kernels`    Σ w_i·CE_i at the LM head without materialising the logits (chunked, CCE, Liger).

May import: torch, transformers and each other; never the training loop, data, models, cache, config or
run records (``tests/test_architecture.py``).
"""

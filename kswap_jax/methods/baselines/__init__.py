"""The methods the papers compare against, each a registered method on the shared core.

  * `continual_forgetting`: the continual-forgetting baselines of the GS-LoRA tables
    (Retrain, FT, L2*, EWC*, MAS*, LwF, DER, DER++, FDR, SCRUB), on GS-LoRA's task sequences.
  * `unlearning`: the machine-unlearning baselines of the SFR-on / SalUn tables (FT, GA, RL,
    SalUn, l1-sparse), on UG-CLU's request streams; the Retrain oracle is `clu_retrain`.
"""

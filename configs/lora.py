"""The `lora` section shared by the PM and PPO configs (rlhf_jax.model.lora)."""
import ml_collections


def lora_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "enabled": False,  # True: train adapters over the frozen init_from / policy_from; checkpoints hold only them
      "rank": 8,
      "alpha": 16.0,  # the update is (alpha / rank) A B
      "dropout": 0.0,  # on the adapters' input, PM training only (RL refuses it: the ratio would not start at 1)
      "targets": "wq,wk,wv,wo,w_gate,w_up,w_down",
      "base_dtype": "",  # "bfloat16" halves the frozen base's memory; "" keeps the base's dtype
  })

"""What each training algorithm (`DanceGRPOConfig.algorithm`) changes w.r.t. GRPO, one module each.

- `"grpo"`: the PPO-clip loss of `objectives.clipped_policy_loss` (DanceGRPO, Flow-GRPO); nothing here.
- `"grpo_guard"`: [`grpo_guard`], GRPO-Guard's regulated clipping (arXiv 2510.22319).

The rollout, rewards, advantages, checkpoints and logging are shared by all.
"""

"""Plots of training logs (used by the command line and the model card)."""


def plot_reward_curve(log_history: list[dict], path: str) -> str:
    """Plot every `rewards/<name>/mean` (and the weighted `reward`) against the step into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({key for log in log_history for key in log if key.startswith("rewards/") and key.endswith("/mean")})
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        points = [(log["step"], log[key]) for log in log_history if key in log and "step" in log]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, label=key.removeprefix("rewards/").removesuffix("/mean"))
    axis.set_xlabel("step")
    axis.set_ylabel("mean reward")
    axis.set_title("DanceGRPO reward")
    if keys:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

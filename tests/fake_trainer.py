"""A stand-in for ``python -m hyperp_megatron.train`` in the sweep-tool tests: same arguments, same files
(config.yaml, metrics.jsonl with a monitor record, final.json), no torch; the final validation loss is a
known function of the run so the fits can be checked:

    val_loss = 3 + 1/sqrt(N-ish scale) + 0.5 * log(lr / lr_opt)^2 + noise(seed),
    lr_opt   = 0.1 * (T / T0)^-0.32 * (muon ? 0.3 : 1)        (lr = the actual peak LR after the rules)

Muon (optim.name muon) is 1.5x less compute-efficient: its loss term uses FLOPs / 1.5. Runs with lr > 1.5 exit 3
("diverged"). Every invocation appends one line to $FAKE_TRAINER_LOG when set.
"""

import json
import math
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperp_megatron.config import load_config, parse_overrides  # noqa: E402
from hyperp_megatron.derived import derive  # noqa: E402


def main(argv):
    config_path = argv[argv.index("--config") + 1]
    rest = argv[:argv.index("--config")] + argv[argv.index("--config") + 2:]
    cfg = load_config(config_path, parse_overrides(rest))
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("FAKE_TRAINER_LOG"):
        with open(os.environ["FAKE_TRAINER_LOG"], "a") as log:
            log.write(run_dir.name + "\n")
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    derived = derive(cfg, 1)
    if derived.lr > 1.5:
        return 3
    t0 = cfg.hyperp.base_tokens
    lr_opt = 0.1 * (derived.trained_tokens / t0) ** -0.32 * (0.3 if cfg.optim.name == "muon" else 1.0)
    flops = derived.train_flops / (1.5 if cfg.optim.name == "muon" else 1.0)
    noise = random.Random(cfg.train.seed * 1000 + int(derived.lr * 1e6)).gauss(0, 0.002)
    val_loss = 3 + 20 * (flops / 1e12) ** -0.3 + 0.5 * math.log(derived.lr / lr_opt) ** 2 + noise
    norm = 27.0 * (derived.lr / lr_opt) ** 0.8
    record = {"step": derived.steps, "loss": val_loss, "monitor/output_rms_inf": norm, "monitor/attn_z": 5.0,
              "monitor/attn_rms": 0.3, "monitor/mlp_rms": 0.3, "monitor/attn_outlier_pct": 0.1,
              "monitor/mlp_outlier_pct": 0.1}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run_dir / "final.json").write_text(json.dumps({"val_loss": val_loss, "step": derived.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

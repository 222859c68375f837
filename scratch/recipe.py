"""The candidate quickstart recipe on the pretrained tiny components (stage configs)."""

from bubogpt.training import TrainConfig

STAGE2_SETS = {"cc_sbu_align": 1.0, "llava_instruct": 3.0, "clotho": 1.0, "vggss": 2.0, "negative_pairs": 2.0}


def stage_configs(overrides: dict, negatives: bool = True) -> list[TrainConfig]:
    stage2_sets = dict(STAGE2_SETS) if negatives else {k: v for k, v in STAGE2_SETS.items() if k != "negative_pairs"}
    configs = {
        "stage1": TrainConfig(
            stage="stage1", datasets={"wavcaps": 1.0}, prompt_style="caption", batch_size=16,
            lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=20, max_steps=300,
            max_txt_len=64, grad_clip=1.0, log_every=25,
        ),
        "stage2": TrainConfig(
            stage="stage2", datasets=stage2_sets, prompt_style="instruction", batch_size=16,
            lr=5e-4, min_lr=5e-5, warmup_start_lr=1e-5, warmup_steps=40, max_steps=600,
            max_txt_len=96, grad_clip=1.0, log_every=25,
        ),
    }  # fmt: skip
    return [configs[name].with_overrides(overrides.get(name, {})) for name in configs if overrides.get(name) != "skip"]

"""train.ema: an exponential moving average of the weights, evaluated and saved as best instead of the raw ones."""

from __future__ import annotations

from vistrain.engine.distributed import unwrap
from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.engine.loop import Step


class Ema(Hook):
    """Creates timm's ``ModelEmaV3`` as ``state.ema`` before the model is compiled (a compiled module's deepcopy
    would call the original) and updates it after every optimiser update. Its weights are the last checkpoint's
    ``ema`` entry, beside ``model`` (the weights files read them there); a resumed fold loads them back here."""

    name = "ema"

    def __init__(self, decay: float):
        self.decay = decay

    def before_train(self, fold: FoldRun) -> None:
        from timm.utils import ModelEmaV3

        # Warm-up: the effective decay grows with the step count, so short runs are not dominated by the
        # random initial weights.
        fold.state.ema = ModelEmaV3(unwrap(fold.state.model), decay=self.decay, use_warmup=True)
        saved = fold.restored.get("ema") if fold.restored is not None else None
        if saved is not None:
            fold.state.ema.module.load_state_dict(saved)

    def after_step(self, fold: FoldRun, step: Step) -> None:
        if step.updated:
            fold.state.ema.update(unwrap(fold.state.model), step=fold.state.num_updates)

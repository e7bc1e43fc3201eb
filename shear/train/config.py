"""Typed configs of the trainer: optimisation (TrainConfig), adapters (LoraConfig), distillation
(DistillConfig). Recipes map onto these in shear/config.py; unknown keys are errors."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoraConfig(BaseModel):
    """Low-rank adapters (Hu et al. 2021, W + (alpha/r) B A) trained through peft, merged at export."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] | str | None = Field(
        None,
        description="modules that get adapters: names matched against the end of the module path "
                    "(e.g. q_proj), or 're:REGEX' matched against the full path; a list may mix both. "
                    "null = every projection of the model's family (shear.analyze.families.lora_targets); "
                    "each entry must match at least one module")

    @model_validator(mode="after")
    def _targets(self):
        if self.target_modules is None:
            return self
        items = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not items or any(not t or t == "re:" for t in items):
            raise ValueError("target_modules: needs at least one non-empty module name or 're:REGEX'")
        return self


class TrainConfig(BaseModel):
    """One training run: pretraining, fine-tuning, or recovery of a pruned student."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step; "
                            "global batch = batch_size * grad_accum * processes")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / peak lr for cosine and linear decay")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (not applied to norms and biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps from 0 to lr")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="lr decay after warmup")
    max_grad_norm: float | None = Field(1.0, description="clip the global gradient norm to this; null = no clipping")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (weights and optimizer stay fp32)")
    eval_every: int = Field(0, ge=0, description="evaluate validation PPL every N steps (0 = only at the end)")
    eval_batches: int = Field(0, ge=0, description="validation batches per evaluation (0 = the whole validation set)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    log_every: int = Field(10, gt=0, description="write train metrics every N steps")
    seed: int = Field(0, description="seed of initialisation-independent randomness: data order, dropout")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="the student's dropout probability while training "
                                  "(every torch.nn.Dropout and Llama-style attention_dropout); null = the model's own; "
                                  "0 = off, usual for distillation; the returned model gets its own values back")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, ~30% slower)")
    lora: LoraConfig | None = Field(None, description="train low-rank adapters instead of all weights; null = full fine-tuning")
    full_finetune: bool = Field(True, description="train every weight; must be false when lora is set (set automatically)")
    resume: bool = Field(True, description="continue from the newest checkpoint in the output directory when one exists")

    @model_validator(mode="before")
    @classmethod
    def _mode(cls, data):
        if isinstance(data, dict) and data.get("lora") is not None:
            if data.get("full_finetune") is True:
                raise ValueError("full_finetune: must be false when lora is set (adapters only are trained)")
            data = {**data, "full_finetune": False}
        elif isinstance(data, dict) and data.get("full_finetune") is False:
            raise ValueError("full_finetune: false needs a lora section (nothing would be trained)")
        return data

    @model_validator(mode="after")
    def _ranges(self):
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm: must be > 0 or null")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} exceeds steps ({self.steps})")
        return self


class DistillConfig(BaseModel):
    """Knowledge distillation from a frozen teacher (Hinton et al. 2015; GKD, Agarwal et al. 2024;
    Minitron, Muralidharan et al. 2024). Loss = ce_weight*CE + kd_weight*T^2*D(teacher, student)
    + hidden_weight*H(proj(h_student), h_teacher); for an encoder (no LM head) CE and logit KD do not exist and
    the loss is embedding_weight*E(pool(h_student), pool(h_teacher)) + hidden_weight*H."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="teacher model directory or hub name; null = the unpruned model of the same run")
    ce_weight: float = Field(0.0, ge=0.0, description="weight of cross-entropy on the data labels")
    kd_weight: float = Field(1.0, ge=0.0, description="weight of the logit distillation loss")
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl = KL(teacher||student); reverse_kl = KL(student||teacher); "
                                  "jsd = generalized Jensen-Shannon with jsd_beta")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="jsd: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature T of both models; the loss is multiplied by T^2")
    chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the fp32 logit loss (bounds peak memory to chunk x vocab)")
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state loss (0 = off)")
    hidden_loss: Literal["mse", "cosine"] = Field("mse", description="hidden-state loss: mean squared error or 1 - cosine similarity")
    layer_map: list[int] | Literal["auto"] | None = Field(
        "auto", description="teacher layer (1-based output index) matched by each student layer; 'auto' spreads "
                            "student layers evenly over teacher depth ending at the last layer; null = last layer only")
    embedding_weight: float = Field(0.0, ge=0.0, description="weight of the pooled sentence-embedding loss (encoders: "
                                    "mean over the attention mask of the final hidden states; 0 = off)")
    embedding_loss: Literal["cosine", "mse"] = Field("cosine", description="embedding loss: 1 - cosine similarity or "
                                                                           "mean squared error of the pooled embeddings")
    teacher_dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype the frozen teacher runs in")
    teacher_placement: Literal["auto", "device", "cpu_offload"] = Field(
        "auto", description="where the frozen teacher runs: device = a full replica on each rank's device; "
                            "cpu_offload = weights in host memory, each module's moved to the device for its forward "
                            "only (the output embeddings stay there); auto = cpu_offload when the student's parameters "
                            "are sharded (DeepSpeed ZeRO-3), else device")

    @model_validator(mode="after")
    def _weights(self):
        if self.ce_weight == 0 and self.kd_weight == 0 and self.hidden_weight == 0 and self.embedding_weight == 0:
            raise ValueError("kd_weight: ce_weight, kd_weight, hidden_weight and embedding_weight are all 0 (no loss)")
        if isinstance(self.layer_map, list) and any(i < 1 for i in self.layer_map):
            raise ValueError("layer_map: teacher layer indices are 1-based (1 = output of the first layer)")
        return self

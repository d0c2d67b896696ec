"""Teacher (logit) distillation healing: chunked KL equals the plain KL (fused and checkpointed, values and
gradients), a healing step lowers it (LoRA and full-parameter), bad input is named."""

import lightning as L
import pytest
import torch
from conftest import make_tiny_model, random_ids
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.modules.healing import HealingModule
from lightning_prune.stages import PruneStage
from lightning_prune.teacher import TeacherDistillation, causal_lm_loss, distillation_kl, final_hidden, fusable, head_losses


def plain_kl(student, teacher, ids, temperature=1.0, reverse=False):
    log_s = torch.log_softmax(student(input_ids=ids).logits / temperature, -1)
    log_t = torch.log_softmax(teacher(input_ids=ids).logits / temperature, -1)
    first, second = (log_s, log_t) if reverse else (log_t, log_s)
    return (first.exp() * (first - second)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("loss", "temperature", "chunk"), [("forward_kl", 1.0, 5), ("reverse_kl", 2.0, 7), ("forward_kl", 0.5, 1000)])
def test_chunked_kl_equals_the_plain_kl(loss, temperature, chunk, fused):
    student, teacher = make_tiny_model("llama"), make_tiny_model("llama", seed=1)
    ids = random_ids(2, 16)
    chunked = distillation_kl(
        final_hidden(student, ids),
        final_hidden(teacher, ids),
        student.lm_head,
        teacher.lm_head,
        temperature=temperature,
        loss=loss,
        chunk_tokens=chunk,
        fused=fused,
    )
    torch.testing.assert_close(chunked, plain_kl(student, teacher, ids, temperature, reverse=loss == "reverse_kl"))
    same = distillation_kl(final_hidden(teacher, ids), final_hidden(teacher, ids), teacher.lm_head, teacher.lm_head, loss=loss)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_lm_loss_equals_the_hugging_face_loss(fused):
    model, ids = make_tiny_model("qwen2"), random_ids(2, 16)
    expected = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(causal_lm_loss(final_hidden(model, ids), model.lm_head, ids, chunk_tokens=7, fused=fused), expected)


def _losses_and_gradients(family: str, fused: bool, **options) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(total, KL, LM) and the student's parameter gradients of 2.5 x total, every parameter training."""
    student, teacher = make_tiny_model(family), make_tiny_model("llama", seed=1)
    ids = random_ids(2, 16)
    losses = head_losses(
        final_hidden(student, ids),
        student.lm_head,
        teacher_hidden=final_hidden(teacher, ids),
        teacher_head=teacher.lm_head,
        input_ids=ids,
        fused=fused,
        **options,
    )
    (2.5 * losses[0]).backward()
    return [loss.detach() for loss in losses], {name: p.grad for name, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
@pytest.mark.parametrize(
    "options",
    [
        {"loss": "forward_kl", "alpha": 1.0, "chunk_tokens": 5},
        {"loss": "reverse_kl", "alpha": 0.7, "temperature": 2.0, "chunk_tokens": 7},
        {"loss": "forward_kl", "alpha": 0.3, "temperature": 0.5, "chunk_tokens": 1000},
        {"alpha": 0.0, "chunk_tokens": 9},
    ],
)
def test_the_fused_head_gives_the_checkpointed_values_and_gradients(family, options):
    """Gradients of every weight, the (tied) LM head's included, match autograd through the checkpointed path."""
    fused, fused_grads = _losses_and_gradients(family, True, **options)
    plain, plain_grads = _losses_and_gradients(family, False, **options)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    assert fused_grads.keys() == plain_grads.keys() and "model.embed_tokens.weight" in fused_grads  # the tied head's gradient too
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    alpha = options["alpha"]
    torch.testing.assert_close(fused[0], alpha * fused[1] + (1 - alpha) * fused[2])


def test_the_fused_head_without_gradients_gives_the_same_values():
    student, teacher = make_tiny_model("llama"), make_tiny_model("llama", seed=1)
    ids = random_ids(2, 16)
    options = dict(teacher_hidden=final_hidden(teacher, ids), teacher_head=teacher.lm_head, input_ids=ids, alpha=0.4, chunk_tokens=6)
    with torch.no_grad():
        values = head_losses(final_hidden(student, ids), student.lm_head, **options)
    expected = head_losses(final_hidden(student, ids), student.lm_head, fused=False, **options)
    for a, b in zip(values, expected):
        torch.testing.assert_close(a, b.detach())
    assert fusable(student.lm_head) and not fusable(torch.nn.Sequential(student.lm_head))


class KLProbe(L.Callback):
    """The distillation loss on one fixed batch at the start and at the end of training."""

    def __init__(self, batch):
        self.batch, self.values = batch, []

    def _measure(self, pl_module):
        with torch.no_grad():
            self.values.append(float(pl_module.distillation_losses(self.batch)[1]))  # the KL

    def on_train_start(self, trainer, pl_module):
        self._measure(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._measure(pl_module)


def heal_pruned(tiny_dir, tmp_path, run_dir, max_steps: int, **options) -> tuple[HealingModule, list[float]]:
    """Fit a ``HealingModule(**options)`` after removing 2 layers; returns it and the KL probe's (before, after)."""
    L.seed_everything(0)
    data = TextDataModule(tokenizer=str(tiny_dir), seq_len=32, num_train_samples=8, calibration_samples=4, batch_size=4)
    data.setup("fit")
    probe = KLProbe(data.train_blocks[:4])
    module = HealingModule(model=str(tiny_dir), warmup_steps=1, **options)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[StageCallback([PruneStage(num_layers=2)], run_dir=str(run_dir)), probe, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return module, probe.values


def test_a_teacher_distillation_heal_lowers_the_kl_and_checkpoints_no_teacher(tiny_dir, tmp_path):
    module, (before, after) = heal_pruned(
        tiny_dir,
        tmp_path,
        tmp_path,
        8,
        lora_rank=8,
        lora_dropout=0.0,
        learning_rate=2e-2,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        distill=TeacherDistillation(alpha=0.9, temperature=2.0, chunk_tokens=16),
    )
    assert after < 0.9 * before, (before, after)
    assert module.teacher.config.num_hidden_layers == 6 and module.model.config.num_hidden_layers == 4
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teacher.") for key in state)


def test_a_full_parameter_distillation_heal_lowers_the_kl_and_saves_the_trained_model(tiny_dir, tmp_path):
    """finetune: full trains every decoder weight (embeddings frozen by default); the saved model is the trained one."""
    module, (before, after) = heal_pruned(
        tiny_dir, tmp_path, tmp_path / "run", 6, finetune="full", learning_rate=3e-3, distill=TeacherDistillation()
    )
    assert after < 0.8 * before, (before, after)
    student, teacher = module.model, module.teacher
    assert not isinstance(student, PeftModel) and student.config.num_hidden_layers == 4
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" not in trainable and "lm_head.weight" in trainable  # tiny llama: untied head
    assert all(p.requires_grad for name, p in student.named_parameters() if ".layers." in name)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, teacher.model.layers[0].mlp.down_proj.weight)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(key.startswith("teacher.") for key in state) and "model.model.embed_tokens.weight" not in state
    assert "model.model.layers.0.mlp.down_proj.weight" in state
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = random_ids(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, student.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"loss": "js"}, "choose one of forward_kl, reverse_kl"),
        ({"temperature": 0.0}, "temperature 0.0 must be > 0"),
        ({"alpha": 1.5}, "alpha 1.5 must be in [0, 1]"),
        ({"quantize": "int3"}, "quantize 'int3' is not known"),
    ],
)
def test_bad_distillation_settings_are_named(options, fragment):
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        HealingModule(model="demo", distill=TeacherDistillation(**options))


def test_bad_finetune_settings_are_named():
    with pytest.raises(InputError, match="finetune 'partial' is not known; choose one of lora, full"):
        HealingModule(model="demo", finetune="partial")
    with pytest.raises(InputError, match="finetune: full trains every weight and cannot use a nf4 base"):
        HealingModule(model="demo", finetune="full", quantize="nf4")


def test_a_teacher_with_another_vocabulary_is_refused(tiny_dir, tmp_path, tiny_tokenizer):
    other = tmp_path / "other"
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    module = HealingModule(model=str(tiny_dir), distill=TeacherDistillation(teacher=str(other)))
    with pytest.raises(InputError, match="vocabulary of 300 tokens, the student 256"):
        module.configure_model()

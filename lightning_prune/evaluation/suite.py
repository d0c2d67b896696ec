"""Evaluation data built once and reused: perplexity per source, optional lm-eval tasks.

:class:`EvaluationData` tokenizes the first blocks of each source's test split once, so the
dense model, every stage and the trained model are measured on the same tokens.
:class:`EvaluationSuite` is the settings a recipe's ``evaluation:`` section and the commands
share; ``evaluate(model, tokenizer)`` returns one ``metrics.json`` entry.
"""

from dataclasses import asdict, dataclass

from lightning_prune.data.tasks import is_task
from lightning_prune.data.text import CORPUS_RECORDS, NAMED_CORPORA, corpus_file, data_key, load_blocks, local_data_file
from lightning_prune.errors import InputError
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.results import model_summary

__all__ = ["split_names", "data_location", "EvaluationData", "EvaluationSuite"]


def split_names(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (empty entries dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if str(item).strip()]


def data_location(source: str, split: str) -> str:
    """What to record as the data file: the bundled file (with its document range) for a shortcut, else the name given."""
    if source not in NAMED_CORPORA:
        return source
    path = corpus_file(source, split)
    records = CORPUS_RECORDS.get((source, split))
    return str(path.relative_to(path.parents[1])) + (f" [documents {records[0]}:{records[1]}]" if records else "")


class EvaluationData:
    """Evaluation blocks for one or more sources, tokenized once and reused before/after a change."""

    def __init__(
        self,
        tokenizer,
        sources: list[str],
        *,
        seq_len: int,
        num_samples: int,
        split: str = "test",
        options: tuple[str, str] = ("eval_data", "eval_samples"),
    ):
        data_option, samples_option = options
        if not sources:
            raise InputError(f"{data_option} names no data; pass wikitext2, c4 or a text/jsonl file")
        self.split = split
        self.blocks = {
            data_key(source): load_blocks(tokenizer, source, split=split, seq_len=seq_len, num_samples=num_samples, option=samples_option)
            for source in sources
        }
        self.files = {data_key(source): data_location(source, split) for source in sources}

    def evaluate(self, model, *, batch_size: int, progress: bool = True) -> dict:
        """Perplexity per source plus layer and parameter counts."""
        scores = {
            key: perplexity(model, blocks, batch_size=batch_size, desc=f"perplexity {key}", progress=progress)
            for key, blocks in self.blocks.items()
        }
        return {"perplexity": scores, **model_summary(model)}


@dataclass
class EvaluationSuite:
    """What a run measures after every stage and after training.

    Args:
        data: comma-separated perplexity sources (wikitext2, c4, text/jsonl files); test split.
        seq_len: tokens per perplexity block.
        num_samples: perplexity blocks per source (the first ones).
        batch_size: blocks (or task requests) per forward pass.
        tasks: comma-separated multiple-choice tasks for lm-eval (empty: perplexity only).
        task_dir: directory of <task>.jsonl files (query/choices/gold).
        limit: first items per task (None: all).
        num_fewshot: in-context examples per task question.
    """

    data: str = "wikitext2,c4"
    seq_len: int = 128
    num_samples: int = 16
    batch_size: int = 8
    tasks: str | None = None
    task_dir: str | None = None
    limit: int | None = None
    num_fewshot: int = 0

    def __post_init__(self):
        self._data: EvaluationData | None = None
        self.harness: dict | None = None

    def check(self) -> None:
        """Validate the settings and the local data/task files (before any weight loads)."""
        from lightning_prune.evaluation.harness import check_task_options, resolve_tasks

        if self.seq_len < 2:
            raise InputError(f"evaluation seq_len {self.seq_len} must be >= 2 (a block predicts tokens 1..T-1)")
        for name, value in (("num_samples", self.num_samples), ("batch_size", self.batch_size)):
            if value < 1:
                raise InputError(f"evaluation {name} {value} must be >= 1")
        for source in split_names(self.data):
            if not is_task(source):
                local_data_file(source)
        if split_names(self.tasks or ""):
            check_task_options(self.limit, self.num_fewshot)
            resolve_tasks(split_names(self.tasks), self.task_dir)

    def settings(self) -> dict:
        """The settings as plain data (for ``metrics.json``)."""
        return {**asdict(self), **({"harness": self.harness} if self.harness else {})}

    def evaluate(self, model, tokenizer, *, progress: bool = True) -> dict:
        """Perplexity per source (and task accuracy) of ``model``, plus its layer and parameter counts."""
        if self._data is None:
            self._data = EvaluationData(
                tokenizer,
                split_names(self.data),
                seq_len=self.seq_len,
                num_samples=self.num_samples,
                options=("evaluation.data", "evaluation.num_samples"),
            )
        values = self._data.evaluate(model, batch_size=self.batch_size, progress=progress)
        tasks = split_names(self.tasks or "")
        if tasks:
            from lightning_prune.evaluation.harness import evaluate_tasks

            accuracy = evaluate_tasks(
                model, tokenizer, tasks, task_dir=self.task_dir, limit=self.limit, num_fewshot=self.num_fewshot, batch_size=self.batch_size
            )
            values["tasks"], self.harness = accuracy["tasks"], accuracy["settings"]
        return values

"""Map-style dataset over prepared examples: loads each item's cached Mimi codes."""

from __future__ import annotations

from torch.utils.data import Dataset

from elise.data.items import Example
from elise.layout import NUM_CODEBOOKS


class CodesDataset(Dataset):
    """``dataset[i]`` -> {"id", "text_ids", "codes" [32, T] long, "speaker"} of ``examples[i]``.

    ``dataset[(i, (j, k))]`` (what ``elise.data.context.ContextBatchSampler`` yields) adds
    ``"context"``: the {"id", "text_ids", "codes"} of examples j, k, the segments that precede i.
    """

    def __init__(self, examples: list[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Rows of each item's segment (text + audio + EOS), for the batch sampler."""
        return [e.num_rows for e in self.examples]

    def __getitem__(self, index: int | tuple[int, tuple[int, ...]]) -> dict:
        if isinstance(index, tuple):
            target, context = index
            item = self._load(target)
            item["context"] = [self._load(j) for j in context]
            return item
        return self._load(index)

    def _load(self, index: int) -> dict:
        ex = self.examples[index]
        try:
            codes = ex.load_codes()  # [32, T]
        except Exception as err:  # a corrupt/missing cache file: one clear line, not a numpy traceback
            raise RuntimeError(f"cannot load codes of item {ex.id!r} from {ex.codes_path}: {err}") from None
        if codes.dim() != 2 or codes.shape[0] != NUM_CODEBOOKS or codes.shape[1] != ex.frames:
            raise RuntimeError(
                f"codes of item {ex.id!r} in {ex.codes_path} have shape {list(codes.shape)}, "
                f"expected [{NUM_CODEBOOKS}, {ex.frames}]; delete the file to re-encode it"
            )
        return {"id": ex.id, "text_ids": ex.text_ids, "codes": codes, "speaker": ex.speaker}

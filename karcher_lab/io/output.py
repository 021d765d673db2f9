"""The output directory: atomic creation, and the files around the weights.

Atomicity: everything is written into a hidden temporary sibling, ``.<name>.incomplete-<pid>-<token>``,
which is renamed to the output path only once every file is complete. An interrupted merge (an
exception, Ctrl-C, a full disk) removes the temporary directory; one killed outright (SIGKILL, power
loss) leaves only that hidden, clearly named sibling, never a directory at the output path, and the next
merge into the same path removes such leftovers whose process is gone. With ``overwrite`` an existing
output is replaced only at the very end (renamed aside, the new one renamed in, the old one deleted).

Around the weights, the output holds what transformers' ``from_pretrained`` needs and a record of the
merge: ``config.json`` (the donor's, with ``torch_dtype`` set to the output dtype), the donor's
``generation_config.json``, the tokenizer files of the tokenizer source, ``merge_recipe.yml`` (the
recipe with every default resolved) and ``README.md`` (a short model card). Every file is written
deterministically (sorted JSON keys, no timestamps).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from karcher_lab.errors import OutputError

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


def _incomplete_prefix(out: Path) -> str:
    return f".{out.name}.incomplete-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_incomplete(out: Path) -> None:
    """Delete temporary siblings of ``out`` left by merges whose process no longer exists."""
    if not out.parent.is_dir():
        return
    for candidate in out.parent.glob(_incomplete_prefix(out) + "*"):
        pid_text = candidate.name[len(_incomplete_prefix(out)):].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


def check_output_path(out: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse a path that is (inside) a source, one under a file, an existing output (unless
    ``overwrite``) or a non-directory; ``sources`` are the local directories of the models."""
    out = out.absolute()
    for src in sources:
        src = src.resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise OutputError(f"output {out} is (inside) the source model {src}; sources are never modified")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"output {out} cannot be created: {blocking} is a file, not a directory")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        if not overwrite:
            raise OutputError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` when the block succeeds."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_incomplete(out)
    tmp = out.parent / f"{_incomplete_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputError(f"output {out} appeared during the merge; the result was discarded")
            old = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"no space left on device while writing {out}; the partial output was removed") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def output_config(donor_config: Mapping[str, Any], dtype_name: str, untied_head: bool) -> dict[str, Any]:
    """The donor's config with ``torch_dtype`` (and ``dtype``, transformers ≥ 4.56's key) set to the
    output dtype, and ``tie_word_embeddings: false`` when the output stores its own head."""
    config = dict(donor_config)
    config["torch_dtype"] = dtype_name
    if "dtype" in config:
        config["dtype"] = dtype_name
    if untied_head:
        config["tie_word_embeddings"] = False
    return config


def copy_files(source_dir: Path | None, out_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the files of ``names`` that exist in ``source_dir`` (byte for byte); return those copied."""
    copied = []
    if source_dir is None:
        return copied
    for name in names:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            copied.append(name)
    return copied


def model_card(method: str, models: list[str], base: str | None, recipe_yaml: str, version: str) -> str:
    """A short README naming the method and the sources, with the recipe used."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- karcher-lab",
        "---",
        f"# Merged model ({method})",
        "",
        f"Merged with karcher-lab {version} using the `{method}` method.",
        "",
        "## Sources",
        "",
    ]
    if base is not None:
        lines.append(f"- base model: `{base}`")
    lines += [f"- `{m}`" for m in models]
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)

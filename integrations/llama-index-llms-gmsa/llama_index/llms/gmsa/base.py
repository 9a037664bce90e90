"""GMSALLM: a LlamaIndex LLM that answers from GMSA soft tokens.

It reads prompts built from its own templates (:func:`gmsa_query_engine_kwargs`), resolves the
``<gmsa:{key}>`` markers that ``GMSACompressor`` put in place of the retrieved chunks into their soft
tokens, and builds the decoder input itself with :meth:`GMSAModel.qa_prompt <gmsa_rag.model.GMSAModel.qa_prompt>`:
chat template + instruction + ``Document [i]: <soft tokens>`` per document, in prompt order + question.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Literal, Optional, Sequence

import torch
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import PromptTemplate, PromptType

from gmsa_rag.markers import (
    GMSAPromptError,
    QA_TEMPLATE,
    REFINE_TEMPLATE,
    SUMMARY_TEMPLATE,
    ParsedPrompt,
    SoftTokenStore,
    parse_prompt,
    store_for,
)
from gmsa_rag.prompt import QA_INSTRUCTION, Segment, chat_segments

logger = logging.getLogger(__name__)

RefineMode = Literal["new_or_keep", "with_previous"]


class ContextWindowError(GMSAPromptError):
    """The decoder input (soft tokens + text + answer budget) does not fit the decoder's window.

    A RuntimeError, not a ValueError: LlamaIndex's refine/compact synthesizers swallow ValueErrors.
    """


@dataclass
class GenerationStats:
    """What the latest ``complete``/``stream_complete`` call fed the decoder and how long it took."""

    kind: str = ""
    documents: int = 0
    soft_documents: int = 0
    soft_tokens: int = 0
    text_tokens: int = 0
    prompt_positions: int = 0
    """Decoder input length: soft tokens + text tokens."""
    new_tokens: int = 0
    ttft_seconds: float | None = None
    """Time to the first streamed answer text: prompt building, prefill and the decode steps until the streamer shows
    the first word (it holds a word until the next token is decoded); streaming only."""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def gmsa_prompt_templates() -> Dict[str, PromptTemplate]:
    """The QA, refine and summary templates GMSALLM understands."""
    return {
        "text_qa_template": PromptTemplate(QA_TEMPLATE, prompt_type=PromptType.QUESTION_ANSWER),
        "refine_template": PromptTemplate(REFINE_TEMPLATE, prompt_type=PromptType.REFINE),
        "summary_template": PromptTemplate(SUMMARY_TEMPLATE, prompt_type=PromptType.SUMMARY),
    }


def gmsa_query_engine_kwargs() -> Dict[str, PromptTemplate]:
    """Keyword arguments for ``index.as_query_engine(...)`` / ``get_response_synthesizer(...)`` so that
    every response mode (compact, refine, tree_summarize, simple_summarize, accumulate) prompts GMSALLM
    in a form it can parse."""
    return gmsa_prompt_templates()


def _beam_search(gen_kwargs: Dict[str, Any]) -> bool:
    """Whether these generate kwargs ask for beam search (which Hugging Face cannot stream)."""
    return int(gen_kwargs.get("num_beams", 1) or 1) > 1


def _counting_streamer(base: Any = None) -> Any:
    """A streamer that counts generated tokens (exactly), optionally forwarding to ``base``."""
    from transformers.generation.streamers import BaseStreamer

    class CountingStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.tokens = 0
            self.ended = False
            self._prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self._prompt_seen:  # generate() first puts the prompt ids (empty with inputs_embeds)
                self._prompt_seen = True
            else:
                self.tokens += int(value.numel())
            if base is not None:
                base.put(value)

        def end(self) -> None:
            if not self.ended:
                self.ended = True
                if base is not None:
                    base.end()

    return CountingStreamer()


class GMSALLM(CustomLLM):
    """LlamaIndex LLM over a :class:`gmsa_rag.GMSAModel` that reads retrieved documents as soft tokens.

    Args:
        model: the GMSA model (its decoder generates; not serialised).
        store: soft-token store shared with ``GMSACompressor``; default: the one owned by ``model``.
        max_new_tokens: answer budget (also ``metadata.num_output``).
        generate_kwargs: passed to Hugging Face ``generate`` (greedy by default).
        instruction: the task instruction placed before the documents.
        extractive: hold every question's answer to a span of its retrieved documents' text (which
            ``GMSACompressor`` keeps in the shared store beside their soft tokens; :mod:`gmsa_rag.extractive`).
            For short factual answers; decodes through Hugging Face ``generate``. Summaries stay free.
        extract_top: with ``extractive``, quote only the ``extract_top`` retrieved documents that match the question
            best (BM25, :mod:`gmsa_rag.lexical`); the decoder still reads all of them. 0 (default): any of them.
        extract_penalty: with ``extractive``, the nats a token loses for continuing no span of the documents:
            ``inf`` (default) forbids it; a finite penalty (e.g. 4) only leans the answer towards the documents'
            words, so answers that are no span (yes / no, a sum) stay possible.
        refine_mode: how a ``refine`` call (one new document + the existing answer) is answered:
            ``new_or_keep`` (default): answer from the new document(s) alone; keep the existing answer if
            that answer comes out empty. ``with_previous``: the existing answer is given to the decoder as
            an extra text document after the new one(s), and the decoder's answer replaces it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Any = Field(exclude=True, description="gmsa_rag.GMSAModel")
    store: Any = Field(default=None, exclude=True, description="SoftTokenStore shared with GMSACompressor")
    max_new_tokens: int = Field(default=64, gt=0, description="answer budget in tokens")
    generate_kwargs: Dict[str, Any] = Field(default_factory=dict, description="extra HF generate kwargs")
    instruction: str = Field(default=QA_INSTRUCTION, description="instruction before the documents")
    refine_mode: RefineMode = Field(default="new_or_keep", description="how refine calls are answered")
    extractive: bool = Field(default=False, description="answers are spans of the retrieved documents' text")
    extract_top: int = Field(default=0, ge=0, description="extractive: quote only the K documents of best BM25 match")
    extract_penalty: float = Field(default=float("inf"), gt=0,
                                   description="extractive: nats lost by tokens that continue no span (inf: forbidden)")
    model_name: str = Field(default="gmsa", description="name reported in metadata")

    _last_stats: GenerationStats = PrivateAttr(default_factory=GenerationStats)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        model: Any,
        store: Optional[SoftTokenStore] = None,
        max_new_tokens: int = 64,
        generate_kwargs: Optional[Dict[str, Any]] = None,
        model_name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if getattr(getattr(model, "config", None), "answer_cites", False):
            raise ValueError("this checkpoint was trained to cite documents (--cite_document): GMSALLM does not read "
                             "citations yet; answer with GMSAModel.generate, which strips them")
        if getattr(getattr(model, "config", None), "answer_quotes", False):
            raise ValueError("this checkpoint was trained to quote its evidence (--quote_evidence): GMSALLM does not read "
                             "quotes yet; answer with GMSAModel.generate, which returns the bold answer")
        if kwargs.get("extract_top") and not kwargs.get("extractive"):
            raise ValueError("extract_top narrows extractive answers: set extractive=True too")
        if kwargs.get("extract_penalty", float("inf")) != float("inf") and not kwargs.get("extractive"):
            raise ValueError("extract_penalty leans extractive answers: set extractive=True too")
        if model_name is None:
            base = getattr(getattr(model, "config", None), "base_model", "model")
            model_name = f"gmsa:{base}"
        super().__init__(
            model=model,
            store=store if store is not None else store_for(model),
            max_new_tokens=max_new_tokens,
            generate_kwargs=dict(generate_kwargs or {}),
            model_name=model_name,
            **kwargs,
        )

    @classmethod
    def class_name(cls) -> str:
        return "GMSALLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.model.max_context_tokens() or 2048,
            num_output=self.max_new_tokens,
            is_chat_model=False,
            model_name=self.model_name,
        )

    @property
    def last_stats(self) -> GenerationStats:
        return self._last_stats

    # ------------------------------------------------------------------ prompt -> decoder input
    def build_segments(self, prompt: str, max_new_tokens: Optional[int] = None) -> tuple[list[Segment], ParsedPrompt]:
        """Parse ``prompt``, resolve its markers and build the decoder input; checks the real length
        (soft tokens + text tokens + answer budget) against the decoder's window."""
        segments, parsed, _ = self._prepare(prompt, max_new_tokens or self.max_new_tokens)
        return segments, parsed

    def _prepare(self, prompt: str, budget: int) -> tuple[list[Segment], ParsedPrompt, GenerationStats]:
        parsed = parse_prompt(prompt, self.store)
        tokenizer = self.model.tokenizer
        instruction = self.instruction if not parsed.preamble else f"{parsed.preamble}\n\n{self.instruction}"
        if parsed.kind == "plain":
            segments = chat_segments(tokenizer, parsed.parts)
        else:
            contexts = list(parsed.contexts)
            if parsed.kind == "refine" and self.refine_mode == "with_previous" and parsed.existing_answer:
                contexts.append(f"Earlier answer: {parsed.existing_answer}")
            segments = self.model.qa_prompt(parsed.question, contexts, instruction=instruction)
        stats = self._check_length(segments, parsed, budget)
        return segments, parsed, stats

    def _extract_from(self, parsed: ParsedPrompt, gen_kwargs: Dict[str, Any]) -> None:
        """With ``extractive``, hold a question's answer to spans of its documents' text (in ``gen_kwargs``)."""
        if not self.extractive or parsed.kind not in ("qa", "refine") or not parsed.contexts:
            return
        if any(source is None for source in parsed.sources):
            raise GMSAPromptError(
                "extractive=True needs the text of every retrieved document, but the soft-token store holds "
                "soft tokens without it: give GMSALLM and GMSACompressor the same store (or model)"
            )
        from gmsa_rag.extractive import extractive_processor
        from gmsa_rag.lexical import best_documents

        sources = best_documents(parsed.question, list(parsed.sources), self.extract_top)
        gen_kwargs["logits_processor"] = extractive_processor(self.model, [sources], gen_kwargs, self.extract_penalty)

    def _check_length(self, segments: Sequence[Segment], parsed: ParsedPrompt, budget: int) -> GenerationStats:
        soft = sum(len(s) for s in segments if s.embeds is not None)
        text = sum(len(s) for s in segments if s.token_ids is not None)
        docs = parsed.parts if parsed.kind == "plain" else parsed.contexts
        stats = GenerationStats(
            kind=parsed.kind,
            documents=len(parsed.contexts),
            soft_documents=sum(isinstance(d, torch.Tensor) for d in docs),
            soft_tokens=soft,
            text_tokens=text,
            prompt_positions=soft + text,
        )
        limit = self.model.max_context_tokens()
        if limit and soft + text + budget > limit:
            raise ContextWindowError(
                f"the decoder input needs {soft + text + budget} positions ({soft} soft tokens of "
                f"{stats.soft_documents} compressed documents + {text} text tokens + {budget} for the answer) "
                f"but the decoder's window is {limit}; retrieve fewer documents (similarity_top_k), compress at "
                f"a higher rate, or lower max_new_tokens"
            )
        return stats

    def _generate_kwargs(self, kwargs: Dict[str, Any]) -> tuple[int, Dict[str, Any]]:
        merged = {**self.generate_kwargs, **kwargs}
        merged.pop("formatted", None)
        budget = int(merged.pop("max_new_tokens", self.max_new_tokens))
        return budget, merged

    def _finish(self, parsed: ParsedPrompt, answer: str) -> str:
        answer = answer.strip()
        if parsed.kind == "refine" and self.refine_mode == "new_or_keep" and not answer:
            return parsed.existing_answer or ""
        return answer

    # ------------------------------------------------------------------ LlamaIndex LLM interface
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        start = time.perf_counter()
        budget, gen_kwargs = self._generate_kwargs(kwargs)
        segments, parsed, stats = self._prepare(prompt, budget)
        self._extract_from(parsed, gen_kwargs)
        if _beam_search(gen_kwargs):  # beam search keeps no stream: the answer's tokens are counted after
            if gen_kwargs.pop("streamer", None) is not None:
                raise ValueError("a streamer cannot follow beam search (num_beams > 1): drop one of them")
            with self._lock:
                raw = self.model.generate_from_segments([segments], max_new_tokens=budget, **gen_kwargs)[0]
            stats.new_tokens = len(self.model.tokenizer.encode(raw, add_special_tokens=False))
        else:
            counter = _counting_streamer(gen_kwargs.pop("streamer", None))
            with self._lock:  # one decoder, one generation at a time
                raw = self.model.generate_from_segments(
                    [segments], max_new_tokens=budget, streamer=counter, **gen_kwargs
                )[0]
            stats.new_tokens = counter.tokens
        text = self._finish(parsed, raw)
        stats.seconds = time.perf_counter() - start
        self._last_stats = stats
        return CompletionResponse(text=text, raw={"gmsa": stats.as_dict(), "decoded": raw})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        from transformers import TextIteratorStreamer

        start = time.perf_counter()
        kwargs = {k: v for k, v in kwargs.items() if k != "streamer"}  # this method streams itself, on both paths
        budget, gen_kwargs = self._generate_kwargs(kwargs)
        gen_kwargs.pop("streamer", None)  # (one set in generate_kwargs too)
        if _beam_search(gen_kwargs):  # beams decide the answer only at the end: one chunk, the whole answer
            response = self.complete(prompt, formatted=formatted, **kwargs)
            self._last_stats.ttft_seconds = self._last_stats.seconds

            def whole() -> CompletionResponseGen:
                yield CompletionResponse(text=response.text, delta=response.text, raw=response.raw)

            return whole()
        segments, parsed, stats = self._prepare(prompt, budget)  # errors surface before streaming starts
        self._extract_from(parsed, gen_kwargs)

        def gen() -> CompletionResponseGen:
            streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            counter = _counting_streamer(streamer)
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    # The lock is held here, not by the consumer: a stream read in part and left open (or one
                    # iterated on an event loop beside another) must not hold the decoder past its generation.
                    with self._lock:  # one decoder, one generation at a time
                        self.model.generate_from_segments(
                            [segments], max_new_tokens=budget, streamer=counter, **gen_kwargs
                        )
                except BaseException as err:  # re-raised in the consumer's thread
                    failure.append(err)
                finally:
                    counter.end()  # the consumer must never wait forever, whatever happened

            worker = threading.Thread(target=run, name="gmsa-generate", daemon=True)
            worker.start()
            text = ""
            try:
                for delta in streamer:
                    if not text:
                        delta = delta.lstrip()
                        if not delta:
                            continue
                        stats.ttft_seconds = time.perf_counter() - start
                    text += delta
                    yield CompletionResponse(text=text, delta=delta)
            finally:
                worker.join()
            if failure:
                raise failure[0]
            final = self._finish(parsed, text)
            if final != text or not text:
                # refine kept the existing answer, trailing space was trimmed, or nothing came out at all
                # (LlamaIndex's callbacks need at least one response from a stream)
                delta = final[len(text) :] if final.startswith(text) else final
                yield CompletionResponse(text=final, delta=delta)
            stats.new_tokens = counter.tokens
            stats.seconds = time.perf_counter() - start
            self._last_stats = stats

        return gen()

"""``data.token: auto``: choosing the DreamBooth identifier from the tokenizer's vocabulary.

The DreamBooth paper (Ruiz et al. 2023, section 3.2) binds the subject to a *rare token*: one
the tokenizer keeps as a single piece, of three characters or fewer, taken from a range of the
vocabulary the model has seen little of, so that the word brings no strong prior of its own.
The usual ``sks`` is such a token by the letter of the recipe, but it is the name of a rifle,
which the model does know. The recipe here, for CLIP's BPE (SD 1.x, SDXL):

1. candidates are whole-word pieces (``...</w>``) of 2 or 3 lower-case letters whose id lies in
   the last part of the vocabulary: CLIP's BPE ids follow the merge order, which follows corpus
   frequency, so late ids are rare (ids >= ``COMMON_WORD_MAX_ID`` of CLIP's 49408; for another
   vocabulary the same share of it);
2. a candidate is dropped when it is a common English word or interjection, a well-known
   acronym or brand, an offensive word (the bundled lists below), ``sks``, a word of the class
   noun, the caption template or the prompts, or when the tokenizer does not give it back as
   exactly one piece;
3. of the rest, the one with the smallest ``sha256(f"{seed}:{token}")`` is chosen: the same
   tokenizer and seed always give the same token, independent of the candidates' order, and
   dropping one more word changes the choice only when it was the chosen one.

The prepare stage makes the choice once and records it in ``manifest.json`` (``token`` and
``token_choice``); every later stage reads the token from there.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.data.captions import COMMON_WORD_MAX_ID
from harness.data.errors import DataError

if TYPE_CHECKING:
    from harness.config import DataConfig

__all__ = [
    "AUTO",
    "BLOCKED",
    "COMMON_WORDS",
    "IdentifierContext",
    "TokenChoice",
    "candidate_tokens",
    "choose_token",
    "default_tokenizer",
    "resolve_token",
    "words_of",
]

log = logging.getLogger(__name__)

AUTO = "auto"
_CLIP_VOCAB = 49408
_CANDIDATE = re.compile(r"[a-z]{2,3}")

# Common English words of two and three letters, interjections and chat slang: each has a
# meaning of its own that would compete with the subject.
COMMON_WORDS: frozenset[str] = frozenset(
    """
    aa ab ad ae ag ah ai al am an ar as at aw ax ay ba be bi bo by da de do ed ef eh el em en
    er es ex fa fe go ha he hi hm ho id if in is it jo ka ki la li lo ma me mi mm mo mu my na
    ne no nu od oe of oh oi ok om on op or os ow ox oy pa pe pi po qi re sh si so ta ti to uh
    um un up us ut we wo xi xu ya ye yo za
    ace act add ado ads aft age ago aid ail aim air ale all amp and ant any ape apt arc are
    ark arm art ash ask asp ate awe awl awn axe aye bad bag ban bar bat bay bed bee beg bet
    bib bid big bin bit boa bob bog boo bop bow box boy bra bro bud bug bum bun bus but buy
    bye cab cad cam can cap car cat caw cob cod cog con coo cop cot cow coy cry cub cud cue
    cup cur cut dab dad dam day den dew did die dig dim din dip doe dog don dot dry dub dud
    due dug dun duo dye ear eat ebb eel egg ego eke elf elk elm emu end eon era ere err eve
    ewe eye fad fan far fat fax fed fee fen few fey fez fib fig fin fir fit fix flu fly fob
    foe fog fop for fox fro fry fun fur gab gad gag gal gap gas gel gem get gig gin gnu gob
    god got gum gun gut guy gym had hag ham hap has hat hay hem hen her hew hex hey hid him
    hip his hit hob hoe hog hop hot how hub hue hug hum hut ice icy ilk ill imp ink inn ion
    ire irk its ivy jab jam jar jaw jay jet jig job jog jot joy jug jut keg ken key kid kin
    kit lab lad lag lap law lax lay lea led leg let lid lie lip lit lob log loo lot low lug
    lye mad man map mar mat maw may men met mew mid mix mob mod mom moo mop mow mud mug mum
    nab nag nap nay net new nib nil nip nit nod nor not now nun nut oaf oak oar oat odd ode
    off oft ohm oil old one opt orb ore our out owe owl own pad pal pan pap par pat paw pay
    pea peg pen pep per pet pew pie pig pin pit ply pod pop pot pow pox pro pry pub pug pun
    pup pus put rag ram ran rap rat raw ray red ref rib rid rig rim rip rob rod roe rot row
    rub rue rug rum run rut rye sac sad sag sap sat saw say sea see set sew she shy sin sip
    sir sis sit six ski sky sly sob sod son sop sot sow soy spa spy sty sub sue sum sun sup
    tab tad tag tan tap tar tat tax tea tee ten the thy tic tie tin tip tog toe tom ton too
    top tot tow toy try tub tug tux two urn use van vat vet vex via vie vim vow wad wag wan
    war was wax way web wed wee wet who why wig win wit woe wok won woo wow wry yak yam yap
    yaw yea yel yen yes yet yew yin yip you yum zap zed zen zig zip zit zoo
    aka aww bae bah bam bff brb btw dif duh eek emo emp fab fam ftw hah heh hmm imo lol meh
    nah noo nuh muh oof owo pfft psst rox shh ugh uwu yay yep yey yuh yup
    """.split()
)

# Never chosen: the classic default (a rifle), offensive words and slurs, drugs, and acronyms
# or brands that carry a strong picture (a logo, a product) of their own.
BLOCKED: frozenset[str] = frozenset(
    """
    sks ass cum fag fck fuk jap kkk nig tit wop gyp wtf xxx sex lsd thc cbd hiv hpv std
    aol msn ysl lbj dmx exe ftp hdd usb pdf gif jpg png svg bmw kfc bbc cnn hbo mtv nba nfl
    ufc ibm ps vw
    """.split()
)


@dataclass(frozen=True)
class IdentifierContext:
    """What ``data.token: auto`` chooses with, besides the subject: the model's tokenizer
    (None: :func:`default_tokenizer`) and the words of other prompts to avoid (evaluation
    prompts, the class prompt)."""

    tokenizer: Any | None = None
    source: str = "CLIP BPE (open_clip's vocabulary)"
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenChoice:
    """The chosen identifier and how it was chosen (the manifest's ``token_choice``)."""

    token: str
    token_id: int
    seed: int
    tokenizer: str  # where the vocabulary came from
    candidates: int  # how many tokens were eligible

    def record(self) -> dict[str, Any]:
        """The manifest's ``token_choice``."""
        return {
            "requested": AUTO,
            "token": self.token,
            "token_id": self.token_id,
            "seed": self.seed,
            "tokenizer": self.tokenizer,
            "candidates": self.candidates,
        }


def words_of(texts: Iterable[str | None]) -> set[str]:
    """The lower-case words of ``texts`` (placeholders like ``{token}`` are not words)."""
    out: set[str] = set()
    for text in texts:
        if text:
            out.update(re.findall(r"[a-z0-9]+", re.sub(r"\{[^}]*\}", " ", text.lower())))
    return out


def candidate_tokens(tokenizer: Any, avoid: Iterable[str] = ()) -> list[tuple[str, int]]:
    """``(token, id)`` of every eligible identifier (module docstring, steps 1 and 2)."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    lowest = COMMON_WORD_MAX_ID * len(vocab) // _CLIP_VOCAB
    special = set(getattr(tokenizer, "all_special_tokens", []))
    banned = COMMON_WORDS | BLOCKED | {w.lower() for w in avoid}
    out = []
    for piece, index in vocab.items():
        word = piece[: -len("</w>")] if piece.endswith("</w>") else None
        if word is None or index < lowest or piece in special or word in banned:
            continue
        if _CANDIDATE.fullmatch(word) and tokenizer.tokenize(word) == [piece]:
            out.append((word, index))
    return sorted(out, key=lambda pair: pair[1])


def choose_token(
    tokenizer: Any, seed: int = 0, avoid: Iterable[str] = (), source: str = "tokenizer"
) -> TokenChoice:
    """The identifier for ``data.token: auto`` (module docstring, step 3).

    Raises:
        DataError: the vocabulary has no eligible token (not a CLIP-style BPE).
    """
    found = candidate_tokens(tokenizer, avoid)
    if not found:
        raise DataError(
            f"data.token: auto found no rare one-piece token in the {source} vocabulary; "
            "set data.token to an identifier"
        )

    def rank(pair: tuple[str, int]) -> str:
        return hashlib.sha256(f"{seed}:{pair[0]}".encode()).hexdigest()

    token, index = min(found, key=rank)
    return TokenChoice(token, index, seed, source, len(found))


def default_tokenizer() -> Any:
    """OpenAI CLIP's BPE tokenizer, built offline from the vocabulary open_clip ships: the
    ids of SD 1.x's and SDXL's tokenizers (see :mod:`harness.clip_bpe`: no torch)."""
    from harness.clip_bpe import build_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(Path(tmp))


def resolve_token(
    cfg: DataConfig,
    class_name: str | None,
    prompts: Iterable[str],
    context: IdentifierContext | None = None,
) -> tuple[DataConfig, TokenChoice | None]:
    """``cfg`` with ``data.token: auto`` replaced by the chosen token (``cfg`` itself and None
    for any other token), avoiding the words of the class noun, the caption template,
    ``prompts`` and ``context.avoid``."""
    if cfg.token != AUTO:
        return cfg, None
    context = context or IdentifierContext()
    tokenizer = context.tokenizer if context.tokenizer is not None else default_tokenizer()
    avoid = words_of([class_name, cfg.caption_template, *prompts, *context.avoid])
    choice = choose_token(tokenizer, cfg.token_seed, avoid, context.source)
    log.info(
        "data.token: auto chose %r (id %d of %s, seed %d, %d candidates)",
        choice.token,
        choice.token_id,
        choice.tokenizer,
        choice.seed,
        choice.candidates,
    )
    return cfg.model_copy(update={"token": choice.token}), choice

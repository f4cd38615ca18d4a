"""The copy proposer: tokens copied from the context, the second branch of a verify step next to the drafter's block.

Answers repeat what is already in plain sight (identifiers from the prompt, repeated lines of code, the loops a small
model falls into). For the last `n` committed tokens (`n` from `max_ngram` down to 1, the longest first), the proposer
finds their latest earlier occurrence in the prompt or the answer so far and proposes the tokens that followed it.
A copy that reaches the end of the context goes on with what it has just copied, as LZ77's overlapping copies do:
a loop of period `p` fills the whole proposal instead of stopping after `p` tokens.
This is transformers' prompt lookup (`prompt_lookup_num_tokens`), but the latest occurrence rather than the first, and
with an index: every committed token adds `max_ngram` entries and a proposal is `max_ngram` dictionary lookups, so a
step's work does not grow with the context. Everything lives on the host, where committed tokens already are, so the
proposer adds no device synchronisation to a step.
"""

# The longest suffix matched when `max_matching_ngram_size` is unset: on the target's own HumanEval answers an exact
# replay gives tau 2.613 / 2.644 with suffixes of up to 4 / 8 tokens (drafter B = 4 + a 5-token copy), 2.548 with
# transformers' default of 2 (results/current/copy_branch/overlapping_copy.py).
DEFAULT_MAX_NGRAM = 8


class ContextCopyProposer:
    """Per sequence: an index from every n-gram (`n <= max_ngram`) of its tokens to where its latest occurrence ends.

    Args:
        sequences (`list[list[int]]`): the tokens of every sequence, read (never written) by the proposer; they grow
            as tokens are committed, and `update` indexes what was added.
        starts (`list[int]`): per sequence, where its real tokens begin (left padding is never matched nor copied).
        num_tokens (`int`): the most tokens a proposal holds.
        max_ngram (`int`): the longest suffix that is matched.
    """

    def __init__(
        self, sequences: list[list[int]], starts: list[int], num_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM
    ):
        if num_tokens < 1 or max_ngram < 1:
            raise ValueError(f"num_tokens and max_ngram must be at least 1; got {num_tokens} and {max_ngram}.")
        self.sequences, self.starts = sequences, list(starts)
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.latest_end = [{} for _ in sequences]  # n-gram tuple -> end (exclusive) of its latest indexed occurrence
        self.indexed = list(self.starts)  # per sequence: n-grams ending at or before this position are indexed
        for row in range(len(sequences)):
            self.update(row)

    def update(self, row: int) -> None:
        """Index the n-grams ending before the sequence's last token. The ones ending at its end are its current
        suffix, which must find an *earlier* occurrence, so they join the index only once more tokens follow."""
        tokens, index, start = self.sequences[row], self.latest_end[row], self.starts[row]
        for end in range(self.indexed[row] + 1, len(tokens)):
            for n in range(1, min(self.max_ngram, end - start) + 1):
                index[tuple(tokens[end - n : end])] = end
        self.indexed[row] = max(self.indexed[row], len(tokens) - 1)

    def propose(self, row: int) -> list[int]:
        """`num_tokens` tokens: those that followed the latest earlier occurrence of the longest suffix found, read
        on through the copy itself where they run out (period `len(tokens) - end`); `[]` when not even the last token
        occurred before."""
        tokens, index, start = self.sequences[row], self.latest_end[row], self.starts[row]
        for n in range(min(self.max_ngram, len(tokens) - start), 0, -1):
            end = index.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                period = len(tokens) - end
                return [tokens[end + i % period] for i in range(self.num_tokens)]
        return []

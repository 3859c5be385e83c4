"""The prose of held_out_sources.md (method, the quoted held-out text, what was tried)."""

ABOUT = """\
Model: the embedded demo model (7.5M parameters, 32 experts per layer, top-4), trained on the
first 95% of four sources: Shakespeare, State of the Union addresses, inaugural addresses and
gsm8k math problems with worked answers (as chats). Every set is priced on the last 5% of each
source (its *tail*, which neither the model nor any calibration saw; at most 32,768 tokens per
text), in windows of 512 tokens, 4 windows per step (2048 tokens: the keep set of each step is
computed as in serving), at tau 1, 0.8, 0.6, 0.4, 0.2 and 0. A cell is the perplexity increase
over tau 1, averaged over the texts of its kind (each source counts once).

Calibrations: `all` takes the fit part (first 95%) of all four sources, balanced (equal tokens
per source); `no-<source>` leaves that source out. *In-dist*: the tails of the calibration's own
sources. *Held-out*: the tail of the source the calibration left out; for `all`, the tail of
AlpacaEval's GPT-4 answers as chats (a fifth kind of text, never seen by the model). A set
without calibration (`contiguous-average`) has no in-distribution text: all four tails are
unseen by it. Fit error: assignment-weighted mean over groups of the relative squared error of
the united expert on calibration tokens of a left-out source (before: the starting mean; after:
the kept weights). WikiText stays out of calibration and of these prices."""

CHOICE = """\
The quoted price of a shipped set (fitted on all four sources) is the **leave-one-source-out
estimate**: the same recipe fitted four more times, each time without one source, and priced on
the tail of the source it left out; the mean over the four. It prices what an operator sees on
text the model handles well but the calibration never saw. Its hardest fold is gsm8k (math and
chat, unlike the three prose sources), shown on its own. The fifth kind of text, AlpacaEval
answers, is shown too but not quoted: the model barely knows that text (perplexity ~280 at tau
1), and on text it already predicts poorly the error of united experts is small beside its own,
so such a price understates what brownout costs where the model is useful (the same holds for
WikiText). The estimate is conservative for the shipped set, which was fitted on one source more
than each fold. The manifest of each shipped set stores the in-distribution and AlpacaEval prices
per tau (`brownout eval perplexity --record`) and the estimate (`held_out_estimate`, quoted)."""

TRIED = """\
Per attempt, what it bought (fit errors from `distill_ablation.md`, perplexities from the tables
below):

- *Calibration on the serving mix* (gsm8k chats in the calibration, sources balanced): the
  largest gain by far; see each way's `all` vs `no-gsm8k` rows on the gsm8k tail.
- *Left-out-source validation and early stopping* instead of a random split: the same fit on
  unseen sources (no overfitting shows within 1000 steps; the fit on a left-out source keeps
  improving, slowly), but the reported fit error becomes an honest held-out-source error and a
  group whose fit does not carry over keeps its start.
- *L2 pull toward the start* (anchor 0.1, 1): worse on every left-out source: the averaged or
  count-weighted start is itself far off (relative error ~0.93-0.98), so staying near it costs
  accuracy everywhere.
- *Weight decay* (0.1): no change. *Average instead of count-weighted start*: no change after
  distillation. *3x the steps*: no change. *More tokens*: a quarter of the tokens was worse on
  every left-out source; the sets here use 262,144 calibration tokens (65,536 per source).
- *Fitting each layer on the states of dimmed earlier layers* (`--capture-tau 0`) and
  *similarity grouping*: compared in the way tables (`-tau0`, `similarity-` rows)."""

"""An explanation, not a fold: the chain's input comes from a per-channel step it could not absorb.

MatMul → Add(bias) → BatchNorm with the Add's output also read elsewhere: the chain stops at the Add
(its output has two readers), so the BatchNorm's producer is the Add, not a linear layer. Saying "no
linear neighbour" would mislead; this rule names the shared tensor instead. It never plans a fold.
"""

from __future__ import annotations

from bnfold.onnx.chain import AffineStep
from bnfold.onnx.rules.base import INTO_PRODUCER, Chain, PlanContext, Rule, Site, refuse_shared_output


class SharedAffineProducer(Rule):
    name = "shared-affine"
    direction = INTO_PRODUCER
    priority = 190  # after the producer rules, before the consumer rules: its reason reads as the producer side's

    def match(self, chain: Chain, ctx: PlanContext) -> Site | None:
        if not chain.x.inputs:
            return None
        producer = chain.x.inputs[0]
        if isinstance(ctx.affine_step(producer), AffineStep) and (len(chain.x.outputs) > 1 or ctx.is_output(chain.x)):
            refuse_shared_output(chain, producer, ctx)
        return None


RULES = (SharedAffineProducer(),)

"""Published claims that results/ANALYSIS.md checks at this suite's scale.

Each claim is one ordered comparison on the primary metric of a headline
table (same dataset, protocol, eval, feature space): `better` at
`better_nfe` beats `worse` at `worse_nfe`. `onestep_bench.analysis` marks it
`reproduced` (significant in the claimed direction, Welch p < 0.05 over
seeds), `tie` (not significant), `contradicted` (significant the other
way) or `untested` (a side is missing or has < 2 seeds). The papers make
these claims on ImageNet / CIFAR-10; a toy or small-image verdict says what
holds at this scale, not whether the paper is right.
"""

from __future__ import annotations

CLAIMS: tuple[dict[str, object], ...] = (
    dict(better='meanflow', better_nfe=1, worse='flow_matching', worse_nfe=1,
         source='Geng et al. 2025 (MeanFlow) §1, Tab. 2: 1-NFE FID 3.43 '
                'on ImageNet-256, where 1-step flow matching fails'),
    dict(better='meanflow', better_nfe=2, worse='meanflow', worse_nfe=1,
         source='Geng et al. 2025 (MeanFlow) Tab. 2: 2-NFE FID 2.20 vs '
                '1-NFE 3.43 (XL/2)'),
    dict(better='tvm', better_nfe=1, worse='meanflow', worse_nfe=1,
         source='Zhou et al. 2025 (TVM) Tab. 1: ImageNet-256 1-NFE FID '
                '3.29 vs MeanFlow 3.43'),
    dict(better='tvm', better_nfe=4, worse='tvm', worse_nfe=1,
         source='Zhou et al. 2025 (TVM) Tab. 1: 4-NFE FID 1.99 vs 1-NFE '
                '3.29'),
    dict(better='drifting', better_nfe=1, worse='meanflow', worse_nfe=1,
         source='Deng et al. 2026 (Drifting) Tab. 4: ImageNet-256 latent '
                '1-NFE FID 1.54 vs MeanFlow 3.43'),
    dict(better='drifting', better_nfe=1, worse='tvm', worse_nfe=1,
         source='Deng et al. 2026 (Drifting) Tab. 4 (1.54) vs Zhou et al. '
                '2025 (TVM) Tab. 1 (3.29), both 1-NFE ImageNet-256'),
    dict(better='transition_matching', better_nfe=4,
         worse='flow_matching', worse_nfe=4,
         source='Shaul et al. 2025 (Transition Matching) §5: DTM improves '
                'on flow matching at equal backbone steps'),
    dict(better='f_distill', better_nfe=1, worse='flow_matching',
         worse_nfe=4,
         source='Xu, Nie, Vahdat 2025 (f-distill): the 1-step student '
                'approaches its multi-step teacher (CIFAR-10 FID 1.92)'),
)

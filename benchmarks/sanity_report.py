"""Every preset asked "Who led it?" about a 3K-token field report (issue 29, item 5: is a method's odd answer
the method or a defect?). The report is generated here (one leader, named once near the start).

    python benchmarks/sanity_report.py                      # the presets below
    python benchmarks/sanity_report.py h2o 'h2o(recent_share=0.01)'
"""

import random
import sys
import time

from fastkv import LLM
from fastkv.precision import header

rng = random.Random(5)
regions = [
    "Northern Uplands",
    "Coastal Plain",
    "River Delta",
    "Eastern Forest",
    "Southern Steppe",
    "Lake District",
    "Western Ridge",
    "Central Basin",
]
crops = ["barley", "millet", "lentils", "cassava", "sorghum", "maize", "chickpeas", "rice"]
parts = [
    "# Field report: the 2025 survey of smallholder irrigation\n",
    "## Summary\n",
    "This report describes a two-year survey of smallholder irrigation in eight regions. The survey was led by "
    "Dr. Imran Qadir of the Institute for Dryland Agriculture, who designed the sampling plan and chaired the "
    "review board. Field teams visited 1,240 farms, measured water use at the plot level and interviewed "
    "households about yields, costs and access to credit.\n",
]
for region in regions:
    crop, other = rng.sample(crops, 2)
    farms, wells = rng.randint(120, 190), rng.randint(30, 95)
    parts.append(f"## {region}\n")
    for _ in range(3):
        a, b, c = rng.randint(12, 48), rng.randint(2, 9), rng.randint(100, 900)
        parts.append(
            f"In the {region}, the teams surveyed {farms} farms growing mostly {crop}, with {other} as a second crop. "
            f"About {a} percent of the plots were irrigated from {wells} shared wells, and the median household "
            f"spent {c} dollars a season on pumping. Yields of {crop} rose by {b} percent where drip lines had been "
            f"installed, but maintenance was irregular and several pumps stood idle for weeks after the rains. "
            f"Farmers asked for cheaper spare parts, for training in scheduling water, and for credit that matches "
            f"the harvest calendar rather than the school year.\n"
        )
parts.append("## Recommendations\n")
parts.append(
    "Shared wells need a maintenance fund; drip lines pay back within two seasons where water is scarce; "
    "credit should follow the harvest. The review board endorsed these findings in its final meeting.\n"
)
REPORT = "\n".join(parts)

METHODS = ["fullkv", "snapkv", "fastkv", "gemfilter", "streamingllm", "pyramidkv", "adakv", "h2o",
           "h2o(recent_share=0.01)", "pyramidinfer"]  # fmt: skip

if __name__ == "__main__":
    llm = LLM.load("qwen2.5-0.5b", progress=False)
    print(header(llm.precision))
    prompt = REPORT + "\n\nWho led it?"
    print("prompt tokens:", llm.count_tokens(prompt), "(the leader: Dr. Imran Qadir)")
    for spec in sys.argv[1:] or METHODS:
        start = time.perf_counter()
        result = llm.generate(prompt, spec, max_tokens=24)
        print(f"{spec:45s} {time.perf_counter() - start:6.1f} s  {result.text!r}", flush=True)

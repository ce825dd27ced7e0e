"""Parses a --metrics scrape (stdin) with prometheus_client's own parsers and prints its
samples as JSON: [{"family","type","name","labels","value"}]. argv[1]: "text" for the
Prometheus text format, "openmetrics" for OpenMetrics. A scrape that does not parse exits
non-zero with the parser's error."""
import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

parse = openmetrics_families if sys.argv[1] == "openmetrics" else text_families
samples = []
for family in parse(sys.stdin.read()):
    for s in family.samples:
        samples.append(
            {
                "family": family.name,
                "type": family.type,
                "name": s.name,
                "labels": s.labels,
                "value": s.value,
            }
        )
print(json.dumps(samples))

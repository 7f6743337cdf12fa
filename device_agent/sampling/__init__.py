"""What to send home: the confidence policy (thresholds, random baseline, rate limits, caps)
and drift against the bundle's reference statistics."""

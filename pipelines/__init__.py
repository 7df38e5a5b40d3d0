"""gali.pipelines: the batch contract and its backends (torch, synthetic), the demo data set."""

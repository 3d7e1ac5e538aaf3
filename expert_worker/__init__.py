"""One expert worker per device: the dense layers for its own requests, its own experts, and the
token all-to-all with its peers."""

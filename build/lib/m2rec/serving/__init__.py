"""Online serving: request and response schemas, the ranking core the BentoML service calls (serving/service.py),
and packaging a registered model as a Bento."""

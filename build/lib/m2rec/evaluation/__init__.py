"""Full-ranking leave-one-out evaluation: HR, NDCG and MRR at K over all items."""

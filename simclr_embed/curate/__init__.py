"""``simclr curate``: know an embedded collection — exact and near duplicates, outliers,
clusters, a subset worth labelling, a static gallery (CONTRACT §2)."""

"""Finding what to quantize: every parameter use a model makes (``uses``), the quantizable sites (``sites``),
the analysis of a model into candidates (``graph``) and the include / exclude rules that decide them
(``selectors``)."""

"""After training: the models on held-out data (`evaluate`), MT-Bench-style answers and judges (`mtbench`,
`judges`), lm-evaluation-harness (`lmeval`), AlpacaEval (`alpacaeval`), and the report that gathers them."""

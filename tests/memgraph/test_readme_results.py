"""README's results section is what benchmarks/readme_results.py builds from benchmarks/results (no hand-typed
numbers): a results file changed without regenerating the README fails here."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_readme_results_section_is_generated_from_the_results():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import readme_results
    finally:
        sys.path.remove(str(BENCHMARKS))
    text = readme_results.README.read_text()
    assert readme_results.updated_readme(text) == text, "run: python benchmarks/readme_results.py"


def test_pareto_front_keeps_only_undominated_points():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from e2e import pareto_front
    finally:
        sys.path.remove(str(BENCHMARKS))
    points = [(6.5, 6781.0), (7.3, 7865.0), (7.0, 7000.0), (7.6, 7426.0), (6.5, 6000.0)]
    assert pareto_front(points) == [(6.5, 6781.0), (7.0, 7000.0), (7.3, 7865.0)]

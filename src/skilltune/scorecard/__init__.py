"""Human evaluation: blind A/B and rubric studies, a rater web app, agreement and a verdict."""

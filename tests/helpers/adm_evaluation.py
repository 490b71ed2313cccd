"""ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) written out in float64 numpy/scipy: the
oracle for FID, sFID, Inception Score and precision/recall. Nothing here comes from dit_gspn or torch-fidelity."""
import numpy as np
import scipy.linalg


def adm_frechet(mu1, sigma1, mu2, sigma2):
    """ADM's FIDStatistics.frechet_distance: scipy's sqrtm of the product, its real part, the trace formula."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def adm_statistics(features):
    """ADM's compute_statistics: np.mean and np.cov over the rows."""
    return {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False)}


def adm_inception_score(logits, split_size):
    """ADM's compute_inception_score: softmax, consecutive splits, exp of the mean KL to the split's marginal."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_precision_recall(reference, samples, k=3):
    """ADM's ManifoldEstimator (k = 3): squared distances, radius = the k-th smallest of a row that includes the
    vector's own 0, membership by <=; precision = samples in the reference manifold, recall the converse."""
    def squared(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(squared(reference, reference), axis=1)[:, k]
    sample_radii = np.sort(squared(samples, samples), axis=1)[:, k]
    precision = (squared(samples, reference) <= ref_radii[None, :]).any(1).mean()
    recall = (squared(reference, samples) <= sample_radii[None, :]).any(1).mean()
    return float(precision), float(recall), ref_radii

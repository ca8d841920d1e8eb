"""An independent float64 NumPy implementation of the nn layers, forward and backward, written
plainly (loops over filter taps and windows) for the whole-network tests."""
import numpy as np


def conv_fwd(x, w, b, s, p):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + s * ho:s, j:j + s * wo:s]  # (n, c, ho, wo)
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y + (b[None, :, None, None] if b is not None else 0)


def conv_bwd(dy, x, w, s, p):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = dy.shape[2:]
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + s * ho:s, j:j + s * wo:s]
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, patch)
            dxp[:, :, i:i + s * ho:s, j:j + s * wo:s] += np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    return dxp[:, :, p:p + h, p:p + wd], dw, dy.sum(axis=(0, 2, 3))


def pool_fwd(x, k):
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    win = x[:, :, :ho * k, :wo * k].reshape(n, c, ho, k, wo, k).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, k * k)
    return win.max(-1), win.argmax(-1)


def pool_bwd(dy, arg, x_shape, k):
    n, c, h, w = x_shape
    ho, wo = dy.shape[2:]
    dx = np.zeros(x_shape)
    for a in range(k):
        for b in range(k):
            dx[:, :, a:ho * k:k, b:wo * k:k] += dy * (arg == a * k + b)
    return dx


def softmax_ce(z, labels):
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -logp[np.arange(n), labels].mean()
    p = np.exp(logp)
    d = p.copy()
    d[np.arange(n), labels] -= 1
    return loss, d / n


def forward_backward(spec, params, x, labels):
    """spec: list of ("conv", stride, pad) | ("relu",) | ("pool", k) | ("flatten",) | ("linear",);
    params: list of (w, b) per conv/linear in order. Returns loss, logits, grads [(dw, db)...], dx."""
    cache, h, pi = [], x.astype(np.float64), 0
    for layer in spec:
        kind = layer[0]
        if kind == "conv":
            w, b = params[pi]
            cache.append((h, pi))
            h = conv_fwd(h, w, b, layer[1], layer[2])
            pi += 1
        elif kind == "linear":
            w, b = params[pi]
            cache.append((h, pi))
            h = h @ w.T + b
            pi += 1
        elif kind == "relu":
            cache.append(h)
            h = np.maximum(h, 0)
        elif kind == "pool":
            y, arg = pool_fwd(h, layer[1])
            cache.append((h.shape, arg))
            h = y
        elif kind == "flatten":
            cache.append(h.shape)
            h = h.reshape(h.shape[0], -1)
    logits = h
    loss, d = softmax_ce(logits, labels)
    grads = [None] * pi
    for layer, c in zip(reversed(spec), reversed(cache)):
        kind = layer[0]
        if kind == "conv":
            hin, i = c
            d, dw, db = conv_bwd(d, hin, params[i][0], layer[1], layer[2])
            grads[i] = (dw, db)
        elif kind == "linear":
            hin, i = c
            grads[i] = (d.T @ hin, d.sum(axis=0))
            d = d @ params[i][0]
        elif kind == "relu":
            d = d * (c > 0)
        elif kind == "pool":
            d = pool_bwd(d, c[1], c[0], layer[1])
        elif kind == "flatten":
            d = d.reshape(c)
    return loss, logits, grads, d

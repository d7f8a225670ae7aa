//! ROUGE-L (Lin 2004): the F-measure of the longest common subsequence of two token lists, as
//! Google's `rouge_score` computes it with its default tokenizer (the one Self-Instruct's
//! filter uses, `RougeScorer(["rougeL"], use_stemmer=False)`): the text lowercased, every run of
//! characters outside `[a-z0-9]` a separator (so non-ASCII letters separate too), no stemming.

/// `rouge_score`'s default tokens of `text`: lowercase ASCII alphanumeric runs.
pub fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence of `a` and `b` (O(|a| |b|) time, O(|b|) memory).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F-measure of token lists `target` and `prediction`: with `l` the LCS length,
/// precision `l / |prediction|`, recall `l / |target|`, `F = 2PR / (P + R)`; 0 when either is
/// empty or nothing is shared. Symmetric in its arguments.
pub fn rouge_l_tokens(target: &[String], prediction: &[String]) -> f64 {
    if target.is_empty() || prediction.is_empty() {
        return 0.0;
    }
    let l = lcs_len(target, prediction) as f64;
    if l == 0.0 {
        return 0.0;
    }
    let p = l / prediction.len() as f64;
    let r = l / target.len() as f64;
    2.0 * p * r / (p + r)
}

/// ROUGE-L F-measure of two texts ([`tokens`], then [`rouge_l_tokens`]).
pub fn rouge_l(target: &str, prediction: &str) -> f64 {
    rouge_l_tokens(&tokens(target), &tokens(prediction))
}

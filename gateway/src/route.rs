//! Routing: which ordered chain of payer plugins settles a card at an institution.
//!
//! Rules match on the insured region (by prefix), the insurance type, the institution and
//! whether the card is insured outside the treatment region. Among the rules that match, the
//! most specific wins: the longest region prefix, then a rule naming institutions, then one
//! naming insurance types, then one with a cross-region condition, then the earliest.

use crate::config::RouteConfig;

/// The routing table.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<RouteConfig>,
}

/// What a request is routed by.
#[derive(Debug, Clone, Copy)]
pub struct RouteQuery<'a> {
    /// The card's insured region (6 digits).
    pub insured_region: &'a str,
    /// The insurance type being settled.
    pub insurance_type: &'a str,
    /// The institution.
    pub institution: &'a str,
    /// The institution's (treatment) region.
    pub treatment_region: &'a str,
}

impl Router {
    /// A router over validated rules.
    pub fn new(routes: Vec<RouteConfig>) -> Self {
        Self { routes }
    }

    /// The payer chain for a query, or `None` (`no_route`).
    pub fn route(&self, q: &RouteQuery<'_>) -> Option<&[String]> {
        let cross_region = q.insured_region != q.treatment_region;
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.insurance_types.is_empty() || r.insurance_types.iter().any(|t| t == q.insurance_type))
            .filter(|(_, r)| r.institutions.is_empty() || r.institutions.iter().any(|i| i == q.institution))
            .filter(|(_, r)| r.cross_region.is_none_or(|c| c == cross_region))
            .filter_map(|(index, r)| {
                let prefix =
                    r.regions.iter().filter(|p| q.insured_region.starts_with(p.as_str())).map(|p| p.len()).max()?;
                let score = (
                    prefix,
                    !r.institutions.is_empty(),
                    !r.insurance_types.is_empty(),
                    r.cross_region.is_some(),
                    std::cmp::Reverse(index),
                );
                Some((score, r))
            })
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, r)| r.payers.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rule(
        regions: &[&str],
        types: &[&str],
        institutions: &[&str],
        cross: Option<bool>,
        payers: &[&str],
    ) -> RouteConfig {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        RouteConfig {
            regions: strings(regions),
            insurance_types: strings(types),
            institutions: strings(institutions),
            cross_region: cross,
            payers: strings(payers),
        }
    }

    fn router() -> Router {
        Router::new(vec![
            rule(&["11"], &[], &[], None, &["province"]),
            rule(&["1101"], &[], &[], None, &["city"]),
            rule(&["110105"], &["390"], &[], None, &["county-resident"]),
            rule(&["11"], &[], &[], Some(true), &["province-cross"]),
            rule(&["1101"], &[], &["H1"], None, &["city-h1"]),
        ])
    }

    fn query<'a>(region: &'a str, insutype: &'a str, institution: &'a str, treatment: &'a str) -> RouteQuery<'a> {
        RouteQuery { insured_region: region, insurance_type: insutype, institution, treatment_region: treatment }
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router();
        assert_eq!(r.route(&query("110105", "310", "H2", "110105")), Some(&["city".to_string()][..]));
        assert_eq!(r.route(&query("110105", "390", "H2", "110105")), Some(&["county-resident".to_string()][..]));
        assert_eq!(r.route(&query("110108", "310", "H2", "110105")), Some(&["city".to_string()][..]));
        // Another city of the province, treated here: the cross-region rule beats the general one.
        assert_eq!(r.route(&query("110228", "310", "H2", "110105")), Some(&["province-cross".to_string()][..]));
        assert_eq!(r.route(&query("120101", "310", "H2", "110105")), None);
    }

    #[test]
    fn institution_rule_beats_a_general_one_at_the_same_prefix() {
        assert_eq!(router().route(&query("110105", "310", "H1", "110105")), Some(&["city-h1".to_string()][..]));
    }

    #[test]
    fn cross_region_rule_applies_only_to_cards_from_elsewhere() {
        let r = router();
        // A card from Hebei's neighbour province 11 prefix but another city, treated in 120101.
        assert_eq!(r.route(&query("110000", "310", "H9", "120101")), Some(&["province-cross".to_string()][..]));
        assert_eq!(r.route(&query("110000", "310", "H9", "110000")), Some(&["province".to_string()][..]));
    }

    proptest! {
        #[test]
        fn the_chosen_rule_always_matches(region in "[0-9]{6}", insutype in "3[19]0", institution in "H[12]", treatment in "[0-9]{6}") {
            let r = router();
            if let Some(payers) = r.route(&query(&region, &insutype, &institution, &treatment)) {
                let chosen = r.routes.iter().find(|x| x.payers == payers).expect("from the table");
                prop_assert!(chosen.regions.iter().any(|p| region.starts_with(p.as_str())));
            } else {
                prop_assert!(!region.starts_with("11"));
            }
        }
    }
}

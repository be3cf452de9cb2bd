//! Money: integer minor units and an ISO 4217 currency. No floating point anywhere.

use crate::ids::ParseError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount in the currency's minor units (cents for USD). Always `1..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    /// 10^12 minor units: far above any card payment, far below i64 overflow in sums.
    pub const MAX: i64 = 1_000_000_000_000;

    pub fn new(minor_units: i64) -> Result<Self, ParseError> {
        if minor_units <= 0 {
            return Err(ParseError::new(
                "amount",
                "must be a positive integer in minor units",
            ));
        }
        if minor_units > Self::MAX {
            return Err(ParseError::new(
                "amount",
                format!("must not exceed {} minor units", Self::MAX),
            ));
        }
        Ok(Amount(minor_units))
    }

    pub fn minor_units(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Amount {
    type Error = ParseError;
    fn try_from(v: i64) -> Result<Self, Self::Error> {
        Amount::new(v)
    }
}

impl From<Amount> for i64 {
    fn from(a: Amount) -> i64 {
        a.0
    }
}

/// ISO 4217 alphabetic code of an active currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

/// Active ISO 4217 codes (funds and precious metals excluded: they are not payable).
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BHD",
    "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF",
    "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN",
    "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD",
    "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES",
    "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL",
    "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN",
    "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP",
    "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK",
    "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT",
    "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES", "VND",
    "VUV", "WST", "XAF", "XCD", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWL",
];

impl Currency {
    /// Every accepted code, sorted.
    pub fn codes() -> &'static [&'static str] {
        ISO_4217
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if ISO_4217.binary_search(&s).is_err() {
            return Err(ParseError::new(
                "currency",
                format!("{s:?} is not an active ISO 4217 code (upper case, e.g. \"EUR\")"),
            ));
        }
        let b = s.as_bytes();
        Ok(Currency([b[0], b[1], b[2]]))
    }

    pub fn as_str(&self) -> &str {
        // The bytes come from the ASCII table above.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Currency {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Currency::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_table_is_sorted_for_binary_search() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn currency_parses_known_codes_only() {
        assert_eq!(Currency::parse("EUR").unwrap().as_str(), "EUR");
        for bad in ["eur", "EURO", "XXX", "", "ABC", "XAU"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn amount_bounds() {
        assert!(Amount::new(0).is_err());
        assert!(Amount::new(-5).is_err());
        assert!(Amount::new(1).is_ok());
        assert!(Amount::new(Amount::MAX).is_ok());
        assert!(Amount::new(Amount::MAX + 1).is_err());
    }
}

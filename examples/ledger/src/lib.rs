//! A second domain kappa service, written only against `kappa-runtime`'s public API: account
//! balances. An operation (`deposit` or `withdraw`, in cents) published on
//! `ledger.ops.<account>` either changes the account's balance, which is appended to
//! `ledger.balances.<account>`, or is dead-lettered: a withdrawal larger than the balance is an
//! `overdraft`, a non-positive or absurd amount is `invalid_amount`, anything unreadable is
//! `malformed`. Which store holds the balances (`KAPPA_WORKING`), how many partitions, how
//! instances share them: all settings, none of it code.

use kappa_runtime::compute::{Compute, Context, Decision, Lookup, NoReference, Rejection};

/// Input stream and the subjects operations are published to (`ledger.ops.<account>`).
pub const OPS: (&str, &str) = ("LEDGER_OPS", "ledger.ops");
/// Change log: one balance change per accepted operation (`ledger.balances.<account>`).
pub const BALANCES: (&str, &str) = ("LEDGER_BALANCES", "ledger.balances");
/// Largest amount of one operation, in cents (ten billion currency units).
pub const MAX_CENTS: i64 = 1_000_000_000_000;

/// An operation on an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Adds `cents`.
    Deposit {
        /// Amount, > 0.
        cents: i64,
    },
    /// Takes `cents`, if the balance covers it.
    Withdraw {
        /// Amount, > 0.
        cents: i64,
    },
}

/// An account's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    /// Balance in cents, never negative.
    pub balance_cents: i64,
    /// Operations accepted.
    pub accepted: u64,
}

/// The change: the account after one accepted operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalanceChanged {
    /// The account.
    pub account: String,
    /// The operation accepted.
    #[serde(flatten)]
    pub op: Op,
    /// Balance after it.
    pub balance_cents: i64,
    /// Operations accepted so far, this one included.
    pub accepted: u64,
    /// The operation's sequence in `LEDGER_OPS`.
    pub source_seq: u64,
}

/// The compute.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ledger;

impl Compute for Ledger {
    type Input = Op;
    type State = Account;
    type Change = BalanceChanged;
    type Reference = NoReference;
    const CHANGE_SCHEMA: &'static str = "ledger.balance/1";

    fn decode(&self, _ctx: &Context<'_>, payload: &[u8]) -> Result<Op, Rejection> {
        let op: Op = serde_json::from_slice(payload)
            .map_err(|e| Rejection::new("malformed").with_detail(e.to_string()))?;
        let (Op::Deposit { cents } | Op::Withdraw { cents }) = op;
        if cents <= 0 || cents > MAX_CENTS {
            return Err(Rejection::new("invalid_amount").with_detail(format!("{cents} cents")));
        }
        Ok(op)
    }

    fn decide(
        &self,
        ctx: &Context<'_>,
        account: &Account,
        op: Op,
        _: Lookup<'_, NoReference>,
    ) -> Decision<BalanceChanged> {
        let balance = match op {
            Op::Deposit { cents } => account.balance_cents.saturating_add(cents),
            Op::Withdraw { cents } if cents > account.balance_cents => {
                return Rejection::new("overdraft")
                    .with_detail(format!("balance {} < {cents}", account.balance_cents))
                    .into();
            }
            Op::Withdraw { cents } => account.balance_cents - cents,
        };
        Decision::emit(BalanceChanged {
            account: ctx.key.to_string(),
            op,
            balance_cents: balance,
            accepted: account.accepted + 1,
            source_seq: ctx.seq,
        })
    }

    fn evolve(&self, account: &mut Account, change: &BalanceChanged) {
        account.balance_cents = change.balance_cents;
        account.accepted = change.accepted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(seq: u64) -> Context<'static> {
        Context {
            key: "acct-1",
            seq,
            partition: 0,
            subject: "ledger.ops.acct-1",
            published: kappa_runtime::time::OffsetDateTime::UNIX_EPOCH,
            headers: None,
        }
    }

    fn step(account: &mut Account, seq: u64, payload: &str) -> Decision<BalanceChanged> {
        let decision = match Ledger.decode(&ctx(seq), payload.as_bytes()) {
            Err(r) => Decision::Reject(r),
            Ok(op) => Ledger.decide(&ctx(seq), account, op, Lookup::NotObserved),
        };
        if let Decision::Emit(c) = &decision {
            Ledger.evolve(account, c);
        }
        decision
    }

    fn reason(d: &Decision<BalanceChanged>) -> Option<&str> {
        match d {
            Decision::Reject(r) => Some(&r.reason),
            _ => None,
        }
    }

    #[test]
    fn deposits_and_withdrawals_move_the_balance_and_overdrafts_are_refused() {
        let mut a = Account::default();
        step(&mut a, 1, r#"{"op":"deposit","cents":500}"#);
        let d = step(&mut a, 2, r#"{"op":"withdraw","cents":501}"#);
        assert_eq!(reason(&d), Some("overdraft"));
        assert_eq!(a.balance_cents, 500);
        step(&mut a, 3, r#"{"op":"withdraw","cents":200}"#);
        assert_eq!(
            a,
            Account {
                balance_cents: 300,
                accepted: 2
            }
        );
    }

    #[test]
    fn bad_operations_are_rejected_with_a_reason() {
        let mut a = Account::default();
        assert_eq!(reason(&step(&mut a, 1, "{nope")), Some("malformed"));
        assert_eq!(
            reason(&step(&mut a, 2, r#"{"op":"steal","cents":1}"#)),
            Some("malformed")
        );
        assert_eq!(
            reason(&step(&mut a, 3, r#"{"op":"deposit","cents":0}"#)),
            Some("invalid_amount")
        );
        assert_eq!(
            reason(&step(&mut a, 4, r#"{"op":"deposit","cents":-5}"#)),
            Some("invalid_amount")
        );
        assert_eq!(a, Account::default());
    }

    #[test]
    fn the_change_log_alone_rebuilds_the_account() {
        let mut a = Account::default();
        let mut log = Vec::new();
        for (i, p) in [
            r#"{"op":"deposit","cents":1000}"#,
            r#"{"op":"withdraw","cents":300}"#,
            r#"{"op":"withdraw","cents":800}"#,
            r#"{"op":"deposit","cents":5}"#,
        ]
        .iter()
        .enumerate()
        {
            if let Decision::Emit(c) = step(&mut a, i as u64 + 1, p) {
                log.push(serde_json::to_vec(&c).expect("encodable"));
            }
        }
        let mut rebuilt = Account::default();
        for bytes in &log {
            let c: BalanceChanged = serde_json::from_slice(bytes).expect("decodable");
            Ledger.evolve(&mut rebuilt, &c);
        }
        assert_eq!(rebuilt, a);
        assert_eq!(a.balance_cents, 705);
    }
}

"""Policy on top of the core: the policy's verdicts, the Message-ID ledger, the guard and its budgets,
explain."""

"""The Postfix-native front ends: socketmap and tcp_table, the policy service, the milter."""

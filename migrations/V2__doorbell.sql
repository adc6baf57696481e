-- The doorbell. The daemon sets it above 0 while it waits idle for notifications, and to 0
-- while it is busy draining the ledger (it polls then). Capture functions of durable tables
-- NOTIFY only when it is above 0: every notifying commit takes a cluster-wide lock, so keeping
-- the NOTIFY out of commits made while the daemon is busy anyway keeps concurrent writers fast.
-- A sequence, because setval() is seen by every session at once and leaves no dead rows.
CREATE SEQUENCE post_save.doorbell MINVALUE 0 START WITH 0 NO CYCLE;
